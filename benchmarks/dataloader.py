"""Data-loading throughput per worker: our albumentations pipelines next to torchvision.transforms.v2.

    python benchmarks/dataloader.py                       # 32 px and 224 px JPEG folders, 3 repeats
    python benchmarks/dataloader.py --images 16 --repeats 1 --no-model    # seconds; what the test runs

It writes JPEG folders into a temporary directory (CIFAR-like 32x32 images, and "photos" of
256-500 px sides, smooth gradients with shapes and noise so they compress like real ones), then times
one worker (the main process, one thread for torch and OpenCV, as a DataLoader worker gets) of:

* ours: ``vit.data`` FileDataset (PIL decode) + the albumentations train / eval presets + collate;
* torchvision: ``torchvision.io.decode_jpeg`` + the same train / eval work in ``transforms.v2``
  (random resized crop, flip, colour jitter p=0.8, normalise / resize short side, center crop).

Pipelines run A/B interleaved; each row is the median img/s of ``--repeats`` passes over the folder.
The sources table reads the same 32 px JPEGs, through our train pipeline and one worker, from: the image folder,
the image folder with ``data.cache`` (decoded once into memory), litdata chunks written by
``vit shards`` (``data.dataset: streaming``) and a parquet file (``data.dataset: hf``). Its
first pass includes what ``setup`` does once (scanning, decoding the cache, reading the chunk index, converting
the parquet file into the ``datasets`` cache); the later passes are the median of ``--repeats``.
The last table compares the 32 px train pipeline with the training-step img/s of the default
digits/CIFAR-size model (configs/digits.yaml's architecture at 32 px, batch 64, 2 threads): one
worker must deliver several times what the model consumes, or the data starves it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
DIGITS_MODEL = dict(patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)


# ---- data -------------------------------------------------------------------------------------
def write_jpeg_folder(root: Path, count: int, size: tuple[int, int], seed: int = 0,
                      classes: int = 10) -> list[tuple[str, int]]:
    """Write ``count`` photo-like JPEGs with sides drawn from ``size`` (min, max); return (path, label) pairs."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        h, w = (int(rng.integers(size[0], size[1] + 1)) for _ in range(2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-1, 1, (3, 2)) * 255 / max(h, w)
        img = base + yy[..., None] * slope[:, 0] + xx[..., None] * slope[:, 1]
        img += rng.normal(0, 12, img.shape)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + int(rng.integers(2, w // 2 + 3)), y0 + int(rng.integers(2, h // 2 + 3))],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        label = i % classes
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        pil.save(path, quality=90)
        samples.append((str(path), label))
    return samples


# ---- pipelines ----------------------------------------------------------------------------------
def albumentations_pipelines(img_size: int, crop_pct: float):
    """Our presets (``vit.data.transforms``); the same albumentations ops built here if that module is absent."""
    try:
        from vit.data.transforms import eval_transform, train_transform
        return (train_transform(img_size, MEAN, STD, augment="light"),
                eval_transform(img_size, MEAN, STD, crop_pct=crop_pct))
    except ImportError:
        import albumentations as A
        import cv2
        from albumentations.pytorch import ToTensorV2
        norm = [A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0), ToTensorV2()]
        train = A.Compose([A.RandomResizedCrop(size=(img_size, img_size), scale=(0.08, 1.0),
                                               interpolation=cv2.INTER_CUBIC),
                           A.HorizontalFlip(p=0.5), A.ColorJitter(0.4, 0.4, 0.4, 0.0, p=0.8)] + norm)
        resize = int(round(img_size / crop_pct))
        val = A.Compose([A.SmallestMaxSize(max_size=resize, interpolation=cv2.INTER_CUBIC),
                         A.CenterCrop(img_size, img_size)] + norm)
        return train, val


def torchvision_pipelines(img_size: int, crop_pct: float):
    from torchvision.transforms import InterpolationMode, v2
    bicubic = InterpolationMode.BICUBIC
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=bicubic, antialias=True),
                        v2.RandomHorizontalFlip(),
                        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8)] + norm)
    val = v2.Compose([v2.Resize(int(round(img_size / crop_pct)), interpolation=bicubic, antialias=True),
                      v2.CenterCrop(img_size)] + norm)
    return train, val


class _AlbumentationsDataset(torch.utils.data.Dataset):
    """Our FileDataset where present; the same decode (PIL -> HWC uint8) otherwise."""

    def __init__(self, samples, transform):
        try:
            from vit.data.folder import FileDataset
            self.inner = FileDataset(samples, transform=transform)
        except ImportError:
            self.inner = None
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if self.inner is not None:
            return self.inner[i]
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
        return self.transform(image=image)["image"], label


class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        path, label = self.samples[i]
        return self.transform(decode_jpeg(read_file(path), mode=ImageReadMode.RGB)), label


def _pass(dataset, batch_size: int) -> float:
    """img/s of one pass through a DataLoader in this process (= one worker: decode, transform, collate)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    start = time.perf_counter()
    n = 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


# ---- the same images from each source -------------------------------------------------------------
def write_sources(root: Path, samples: list[tuple[str, int]], val: list[tuple[str, int]]) -> dict[str, Path]:
    """The JPEGs as an image folder (train/, val/), litdata chunks of it, and parquet files (train, validation)."""
    import shutil

    import datasets

    from vit.data.shards import convert
    folder = root / "folder"
    for split, items in (("train", samples), ("val", val)):
        for path, label in items:
            dst = folder / split / f"class{label}" / Path(path).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst)
    convert(folder, root / "chunks", chunk_bytes="16MB", workers=1)
    parquet = root / "parquet" / "data"
    parquet.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=sorted({f"class{lab}" for _, lab in samples}))})
    for split, items in (("train", samples), ("validation", val)):
        table = datasets.Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in items],
                                            "label": [lab for _, lab in items]}, features=features)
        table.to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    return {"image folder": folder, "image folder + data.cache": folder, "litdata chunks (streaming)": root / "chunks",
            "parquet (hf)": root / "parquet"}


def source_rows(sources: dict[str, Path], img_size: int, batch: int, repeats: int, hf_cache: Path) -> list[dict]:
    """One worker's training img/s from each source: first pass (with setup) and warm passes, interleaved."""
    import datasets

    from vit.data import ImageDataModule
    kinds = {"image folder": "imagefolder", "image folder + data.cache": "imagefolder",
             "litdata chunks (streaming)": "streaming", "parquet (hf)": "hf"}
    loaders, first = {}, {}
    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(hf_cache)  # a cold cache: the parquet conversion is part of pass 1
    try:
        for name, root in sources.items():
            start = time.perf_counter()
            dm = ImageDataModule(kinds[name], root=str(root), img_size=img_size, batch_size=batch, num_workers=0,
                                 augment="light", cache=name.endswith("data.cache"))
            dm.setup("fit")
            loaders[name] = dm.train_dataloader()
            n = sum(images.shape[0] for images, _ in loaders[name])
            first[name] = n / (time.perf_counter() - start)
    finally:
        datasets.config.HF_DATASETS_CACHE = saved_cache
    warm = {name: [] for name in sources}
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            n = sum(images.shape[0] for images, _ in loader)
            warm[name].append(n / (time.perf_counter() - start))
    ref = statistics.median(warm["image folder"])
    return [dict(source=name, images=n, first=first[name], ips=statistics.median(warm[name]),
                 ratio=statistics.median(warm[name]) / ref) for name in sources]


# ---- the model the data feeds -------------------------------------------------------------------
def model_train_ips(batch: int, repeats: int, threads: int) -> float:
    """Training-step img/s of the default digits/CIFAR-size model at 32 px (forward, backward, AdamW)."""
    import torch.nn.functional as F

    from vit.models.vision import VisionTransformer
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, num_classes=10, **DIGITS_MODEL).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return batch / statistics.median(times)
    finally:
        torch.set_num_threads(saved)


# ---- main -------------------------------------------------------------------------------------
def parse_args(args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="images per folder (the 224 px folder gets a quarter)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (median)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="32,224", help="output sizes; 32 reads 32 px images, larger ones photos")
    p.add_argument("--threads", type=int, default=2, help="threads for the model's training step")
    p.add_argument("--no-model", action="store_true", help="skip the model training-step comparison")
    p.add_argument("--no-sources", action="store_true", help="skip the image folder / cache / chunks / parquet table")
    return p.parse_args(args)


def main(args=None) -> list[dict]:
    args = parse_args(args)
    import cv2
    rows = []
    saved_threads, saved_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    with tempfile.TemporaryDirectory() as tmp:
        for img_size in (int(s) for s in args.sizes.split(",")):
            small = img_size <= 64
            count = args.images if small else max(args.images // 4, 1)
            samples = write_jpeg_folder(Path(tmp) / f"px{img_size}", count,
                                        (img_size, img_size) if small else (256, 500), seed=img_size)
            crop_pct = 1.0 if small else 0.875
            a_train, a_eval = albumentations_pipelines(img_size, crop_pct)
            t_train, t_eval = torchvision_pipelines(img_size, crop_pct)
            contenders = {
                ("train", "ours (albumentations)"): _AlbumentationsDataset(samples, a_train),
                ("train", "torchvision v2"): _TorchvisionDataset(samples, t_train),
                ("eval", "ours (albumentations)"): _AlbumentationsDataset(samples, a_eval),
                ("eval", "torchvision v2"): _TorchvisionDataset(samples, t_eval),
            }
            torch.set_num_threads(1)  # what a DataLoader worker gets
            cv2.setNumThreads(1)
            try:
                for ds in contenders.values():
                    _pass(torch.utils.data.Subset(ds, range(min(len(ds), args.batch))), args.batch)  # warm-up
                speeds = {k: [] for k in contenders}
                for _ in range(args.repeats):  # interleaved A/B
                    for key, ds in contenders.items():
                        speeds[key].append(_pass(ds, args.batch))
            finally:
                torch.set_num_threads(saved_threads)
                cv2.setNumThreads(saved_cv2)
            for (split, impl), values in speeds.items():
                ref = statistics.median(speeds[(split, "torchvision v2")])
                ips = statistics.median(values)
                rows.append(dict(size=img_size, source="32 px JPEG" if small else "256-500 px JPEG", split=split,
                                 impl=impl, images=count, ips=ips, ratio=ips / ref))
    print("\n| output px | source | pipeline | impl | images | img/s per worker | vs torchvision |")
    print("|---:|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['source']} | {r['split']} | {r['impl']} | {r['images']} | {r['ips']:.0f} | "
              f"{r['ratio']:.2f} |")
    if not args.no_sources:
        sources = [r for r in _sources(args) if r]
        print("\n| source (32 px JPEG, train pipeline, one worker) | images | first pass img/s (with setup) | "
              "later passes img/s | vs image folder |")
        print("|---|---:|---:|---:|---:|")
        for r in sources:
            print(f"| {r['source']} | {r['images']} | {r['first']:.0f} | {r['ips']:.0f} | {r['ratio']:.2f} |")
        rows += [dict(r, split="source") for r in sources]
    if not args.no_model:
        ips = model_train_ips(args.batch, max(args.repeats, 3), args.threads)
        data = [r for r in rows if r["split"] == "train" and r["size"] <= 64 and r["impl"].startswith("ours")]
        print(f"\ndefault digits/CIFAR-size model ({DIGITS_MODEL}, 32 px, batch {args.batch}, "
              f"{args.threads} threads): training step {ips:.0f} img/s")
        for r in data:
            print(f"one worker of the {r['size']} px train pipeline: {r['ips']:.0f} img/s = "
                  f"{r['ips'] / ips:.1f}x the model's training step")
        rows.append(dict(size=32, split="model-train-step", impl="ours", ips=ips))
    return rows


def _sources(args) -> list[dict]:
    import cv2
    saved_threads, saved_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_jpeg_folder(Path(tmp) / "jpeg", args.images, (32, 32), seed=32)
        val = write_jpeg_folder(Path(tmp) / "jpeg_val", max(args.images // 8, 2), (32, 32), seed=33)
        sources = write_sources(Path(tmp), samples, val)
        torch.set_num_threads(1)  # what a DataLoader worker gets
        cv2.setNumThreads(1)
        try:
            return source_rows(sources, 32, args.batch, args.repeats, Path(tmp) / "hf_cache")
        finally:
            torch.set_num_threads(saved_threads)
            cv2.setNumThreads(saved_cv2)


if __name__ == "__main__":
    main()
