"""Training-loop throughput: our CLI (with and without ``data.cache``) against a loop built the way timm's
``train.py`` builds one, on the same image folder and architecture, interleaved.

    python benchmarks/train_loop.py                      # cifar10_small if present (else a synthetic folder)
    python benchmarks/train_loop.py --tiny               # seconds; what the test runs

Each run trains ``--steps`` optimizer steps at batch ``--batch`` and reports training img/s over the steps
after ``--skip`` warm-up steps (data loading waits included: wall time between the ends of those steps).

* ours: ``vit.training.cli`` (LightningCLI, ImageClassifier, ImageDataModule, our callbacks and loggers), the small-data
  architecture with the plain patch embedding and attention (so both sides run the same model);
* ours + cache: the same with ``data.cache: true`` (images decoded once into memory);
* timm loop: ``timm.data.create_dataset`` / ``create_loader`` (its RandomResizedCrop, flip, colour jitter,
  normalisation), ``timm.create_model``-equivalent ``VisionTransformer`` of the same shape,
  ``timm.optim.create_optimizer_v2`` (AdamW), ``timm.scheduler.create_scheduler_v2`` (cosine), label smoothing,
  and a plain PyTorch loop (``train.py``'s ``train_one_epoch`` without AMP and EMA);
* model step alone: that model's forward, backward and AdamW step on one batch held in memory, the most any loop
  can reach on this machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# cifar10_small, a .tgz or its folder (12,000 CIFAR-10 photos as train/<class>/*.jpg and test/<class>/*.jpg, 32 px): give it with
# --cifar PATH or $VIT_CIFAR10_SMALL (docs/performance.md shows how to write one from CIFAR-10); the default is
# where the project's CI keeps its copy, beside the repository
CIFAR = Path(os.environ.get("VIT_CIFAR10_SMALL")
             or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_small.tgz")
ARCH = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)
TINY_ARCH = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def image_folder(workdir: Path, tiny: bool) -> Path:
    """cifar10_small's train/ and test/ (as val/) when present and not tiny, else a synthetic 32 px folder of 4
    classes (noise with a bright quadrant per class)."""
    if CIFAR.is_dir() and not tiny:  # the folder itself: train/ and test/ (as val/)
        root = workdir / "cifar10_small"
        root.mkdir()
        (root / "train").symlink_to(CIFAR.resolve() / "train")
        (root / "val").symlink_to(CIFAR.resolve() / "test")
        return root
    if CIFAR.is_file() and not tiny:
        with tarfile.open(CIFAR) as archive:
            archive.extractall(workdir, filter="data")
        root = next(p.parent for p in workdir.rglob("train") if p.is_dir())
        if not (root / "val").exists() and (root / "test").exists():
            (root / "val").symlink_to(root / "test")
        return root
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", 16 if tiny else 200), ("val", 4 if tiny else 40)):
        for c in range(4):
            folder = workdir / "synthetic" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):  # noise with a bright class-specific quadrant: learnable, so tests can
                image = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)  # check that training learned
                y, x = (c // 2) * 16, (c % 2) * 16
                image[y:y + 16, x:x + 16, c % 3] = 230
                Image.fromarray(image).save(folder / f"{i}.jpg")
    return workdir / "synthetic"


class StepClock:
    """Wall time between the end of step ``skip`` and the end of the last step."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.steps = skip, None, None, 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def images_per_second(self, batch: int) -> float:
        return (self.steps - self.skip) * batch / (self.end - self.start)


def run_ours(root: Path, args, cache: bool, workdir: Path) -> float:
    import lightning as L

    from vit.training.cli import cli
    clock = StepClock(args.skip)

    class Tick(L.Callback):
        def on_train_batch_end(self, *unused):
            clock.tick()

    arch = TINY_ARCH if args.tiny else ARCH
    app = cli(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "small_data.yaml"),
               "--data.root", str(root), "--data.batch_size", str(args.batch), "--data.num_workers", str(args.workers),
               "--data.cache", str(cache).lower(), "--model.backbone.embed_layer", "conv", "--model.backbone.attn_layer", "mha",
               "--model.schedule", "epochs", "--trainer.max_epochs", "1000", "--trainer.max_time", "null",
               "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.default_root_dir", str(workdir / "runs"), "--trainer.accelerator", "cpu",
               # the timm loop's settings, whatever the recipe's are: both sides do the same work per image
               "--data.crop_scale", "[0.35, 1.0]", "--data.color_jitter", "0.2", "--model.backbone.drop_path_rate", "0.1",
               "--model.lr", "0.001", "--model.weight_decay", "0.05", "--model.label_smoothing", "0.1",
               "--model.ema_decay", "null",
               *[f"--model.backbone.{k}={v}" for k, v in arch.items()]], run=False)
    app.trainer.callbacks.append(Tick())
    app.trainer.fit(app.model, datamodule=app.datamodule)
    return clock.images_per_second(args.batch)


def run_timm(root: Path, args) -> float:
    """The loop timm's train.py builds, without its AMP, EMA and distributed branches."""
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    arch = TINY_ARCH if args.tiny else ARCH
    dataset = create_dataset("", root=str(root), split="train", is_training=True)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=args.batch, is_training=True,
                           num_workers=args.workers, scale=(0.35, 1.0), hflip=0.5, color_jitter=0.2,
                           interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           use_prefetcher=False, device=torch.device("cpu"))  # timm's prefetcher is CUDA-only
    model = VisionTransformer(img_size=32, num_classes=len(dataset.reader.class_to_idx), drop_path_rate=0.1, **arch)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    epochs = max(1, args.steps // max(1, len(loader)) + 1)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, warmup_epochs=1,
                                       updates_per_epoch=len(loader))
    criterion = LabelSmoothingCrossEntropy(0.1)
    clock, step = StepClock(args.skip), 0
    model.train()
    while step < args.steps:
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            _ = loss.item()  # timm's loop reads the loss for its meters every step too
            clock.tick()
            if step >= args.steps:
                break
    return clock.images_per_second(args.batch)


def run_model_alone(args) -> float:
    """The ceiling: the same model, optimiser and loss on one batch already in memory (no loader, no loop)."""
    from timm.models.vision_transformer import VisionTransformer
    arch = TINY_ARCH if args.tiny else ARCH
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, num_classes=10, drop_path_rate=0.1, **arch).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images, targets = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    clock = StepClock(args.skip)
    for _ in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(images), targets, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clock.tick()
    return clock.images_per_second(args.batch)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all three")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and folder: seconds")
    parser.add_argument("--cifar", type=Path, default=None,
                        help="cifar10_small: the .tgz or its folder (default: $VIT_CIFAR10_SMALL, else CI's copy beside the repository; "
                             "without one, a synthetic folder)")
    args = parser.parse_args(argv)
    if args.cifar is not None:
        global CIFAR
        CIFAR = args.cifar
    if args.tiny:
        args.steps, args.skip, args.batch, args.workers, args.repeats = min(args.steps, 6), 2, 8, 0, 1
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {"ours": [], "ours + data.cache": [], "timm loop": [],
                                       "model step alone (no data, the ceiling)": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        root = image_folder(workdir, args.tiny)
        for _ in range(args.repeats):  # interleaved: machine noise hits every row alike
            results["timm loop"].append(run_timm(root, args))
            results["ours"].append(run_ours(root, args, cache=False, workdir=workdir))
            results["ours + data.cache"].append(run_ours(root, args, cache=True, workdir=workdir))
            results["model step alone (no data, the ceiling)"].append(run_model_alone(args))
    baseline = statistics.median(results["timm loop"])
    rows = [{"loop": name, "img_s": statistics.median(v), "runs": v, "vs_timm": statistics.median(v) / baseline}
            for name, v in results.items()]
    print(f"\ntraining loop, {root.name}, batch {args.batch}, {args.workers} workers, {args.threads} threads, "
          f"{args.steps} steps ({args.skip} left out), median of {args.repeats}")
    print("| loop | img/s | each run | vs timm loop |\n|---|---|---|---|")
    for row in rows:
        runs = ", ".join(f"{v:.0f}" for v in row["runs"])
        print(f"| {row['loop']} | {row['img_s']:.0f} | {runs} | {row['vs_timm']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
