import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from vit.data import ImageDataModule, eval_transform, load_image, train_transform
from vit.data.sampling import seed_transform


def test_digits_split_is_fixed_seeded_and_disjoint():
    a, b = ImageDataModule("digits", img_size=16), ImageDataModule("digits", img_size=16)
    a.setup(), b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (1258, 180, 359)
    assert np.array_equal(a.test_set.indices, b.test_set.indices)
    parts = [set(a.train_set.indices), set(a.val_set.indices), set(a.test_set.indices)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert a.num_classes == 10 and a.class_names[3] == "3"


def test_digits_batches_are_normalised_tensors():
    dm = ImageDataModule("digits", img_size=16, batch_size=8, augment="none")
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    full = torch.cat([x for x, _ in dm.val_dataloader()])
    assert abs(full.mean().item()) < 0.3 and 0.6 < full.std().item() < 1.5


def test_imagefolder_with_train_and_val(image_folder):
    dm = ImageDataModule("imagefolder", root=str(image_folder), img_size=16, batch_size=4)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    dm.setup()
    assert len(dm.train_set) == 16 and len(dm.val_set) == 16
    # no test/ folder: val doubles as the test split, the same files in the same order (not train's)
    assert dm.test_set.samples == dm.val_set.samples
    assert {p for p, _ in dm.test_set.samples} == {str(p) for p in (image_folder / "val").rglob("*.png")}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    assert set(labels.tolist()) <= {0, 1}


def test_single_folder_is_split_by_seed(tmp_path):
    root = write_image_folder(tmp_path / "flat", per_class=10, splits=("",))
    dm = ImageDataModule("imagefolder", root=str(root), img_size=16, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4
    train_paths = {p for p, _ in dm.train_set.samples}
    assert not train_paths & {p for p, _ in dm.val_set.samples}


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    Image.fromarray(np.full((10, 12), 128, np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((10, 12, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).convert("P").save(tmp_path / "pal.png")
    for name in ("gray.png", "rgba.png", "pal.png"):
        arr = load_image(tmp_path / name, in_chans=3)
        assert arr.shape == (10, 12, 3) and arr.dtype == np.uint8
        assert load_image(tmp_path / name, in_chans=1).shape == (10, 12, 1)
    # transparent pixels are composited on white, not black
    assert load_image(tmp_path / "rgba.png").min() == 255


def test_transforms_produce_requested_size():
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    for aug in ("light", "strong"):
        out = train_transform(32, (0.5,) * 3, (0.5,) * 3, augment=aug, random_erasing=0.5)(image=image)["image"]
        assert out.shape == (3, 32, 32)
    assert eval_transform((24, 40), (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)(image=image)["image"].shape == (3, 24, 40)

    def augmented(seed, **kwargs):  # one image through a freshly built pipeline drawing from a seeded generator
        transform = train_transform(32, (0.5,) * 3, (0.5,) * 3, **kwargs)
        seed_transform(transform, seed)
        return transform(image=image)["image"]

    seeds = range(8)
    assert all(torch.equal(augmented(s, augment="light"), augmented(s, augment="light")) for s in seeds)  # seeded
    # strong adds two RandAugment-style ops (with p=0.9) on top of light's: the same draws give another image
    differ = [not torch.equal(augmented(s, augment="strong"), augmented(s, augment="light")) for s in seeds]
    assert sum(differ) >= 6, differ
    # random erasing with p=1: the same draws, plus one box of at least 3x3 px set to the fill (0 after Normalize)
    for s in seeds:
        plain, erased = augmented(s, augment="light"), augmented(s, augment="light", random_erasing=1.0)
        box = (erased != plain).any(0)
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        assert len(rows) >= 3 and len(cols) >= 3, s
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a filled rectangle
        assert (erased[:, box] == 0).all() and torch.equal(erased[:, ~box], plain[:, ~box])


def test_padded_crop_shifts_the_image_without_resampling_it():
    """data.crop_padding (CIFAR's crop): every training image is the original shifted by at most the padding
    (reflected at the border), pixel for pixel; the positions vary with the seed."""
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    shifts = set()
    for seed in range(12):
        transform = train_transform(32, (0.0,) * 3, (1 / 255,) * 3, hflip=False, color_jitter=0.0, crop_padding=4)
        seed_transform(transform, seed)
        out = transform(image=image)["image"].permute(1, 2, 0).round().numpy().astype(np.uint8)
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if np.array_equal(padded[dy:dy + 32, dx:dx + 32], out)]
        assert found, f"seed {seed}: not a shifted copy of the image"
        shifts.add(found[0])
    assert len(shifts) >= 6
    # the random resized crop instead resamples: its output is (almost never) a shifted copy
    transform = train_transform(32, (0.0,) * 3, (1 / 255,) * 3, hflip=False, color_jitter=0.0, crop_scale=(0.5, 0.6))
    out = transform(image=image)["image"].permute(1, 2, 0).round().numpy().astype(np.uint8)
    assert not any(np.array_equal(padded[dy:dy + 32, dx:dx + 32], out) for dy in range(9) for dx in range(9))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="mnist"), "data.dataset"),
    (dict(crop_padding=-2), "data.crop_padding"),
    (dict(dataset="imagefolder"), "data.root: required"),
    (dict(dataset="imagefolder", root="/nonexistent/folder"), "not a directory"),
    (dict(batch_size=0), "data.batch_size"),
    (dict(val_fraction=0.5, test_fraction=0.5), "leave training data"),
    (dict(augment="heavy"), "data.augment"),
])
def test_bad_data_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


def test_cifar_without_files_explains_download(tmp_path):
    dm = ImageDataModule("cifar10", root=str(tmp_path), img_size=32)
    with pytest.raises(FileNotFoundError, match="data.download: true"):
        dm.setup()


def _training_batches(dm, epochs=(0, 1)):
    """Every training batch of the given epochs, as Lightning would draw them (``set_epoch`` before each)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        batches += [(images.clone(), labels.clone()) for images, labels in loader]
    return batches


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_training_batches_do_not_depend_on_num_workers(source, tmp_path):
    # README: "data order independent of num_workers" -- the shuffle and every augmentation draw are seeded by
    # (seed, epoch, position), never by which worker process decodes the image.
    if source == "digits":
        kwargs = dict(dataset="digits", img_size=16, batch_size=128)
    else:
        root = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=6)
        kwargs = dict(dataset="imagefolder", root=str(root), img_size=16, batch_size=4)
    kwargs.update(augment="strong", hflip=True, color_jitter=0.4, crop_scale=(0.3, 1.0), random_erasing=0.5, seed=3)
    serial = _training_batches(ImageDataModule(**kwargs, num_workers=0))
    parallel = _training_batches(ImageDataModule(**kwargs, num_workers=2))
    assert len(serial) == len(parallel) > 2
    for k, ((x0, y0), (x2, y2)) in enumerate(zip(serial, parallel)):
        assert torch.equal(y0, y2), f"batch {k}: labels (order) differ"
        assert torch.equal(x0, x2), f"batch {k}: images (augmentation) differ"
    # and the comparison has teeth: the data are shuffled and augmented anew each epoch
    half = len(serial) // 2
    assert not torch.equal(serial[0][0], serial[half][0])
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(serial[:half], serial[half:]))


@pytest.mark.parametrize("n,world", [(13, 2), (13, 3), (64, 2), (5, 4)])
def test_epoch_sampler_splits_between_processes_and_resumes_each_share(n, world):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from vit.data.sampling import EpochSampler
    # one process: the order of (seed, epoch) is what it always was
    assert [i for i, _ in EpochSampler(8, seed=0)] == [4, 1, 3, 5, 0, 2, 6, 7]
    whole = EpochSampler(n, seed=5)
    whole.set_epoch(2)
    order = list(whole)
    shares = []
    for rank in range(world):
        sampler = EpochSampler(n, seed=5, num_replicas=world, rank=rank)
        sampler.set_epoch(2)
        shares.append(list(sampler))
        # the split Lightning's DistributedSamplerWrapper made of the one-process order: DDP runs keep their data
        wrapped = DistributedSamplerWrapper(EpochSampler(n, seed=5), num_replicas=world, rank=rank, shuffle=False)
        wrapped.set_epoch(2)
        assert shares[-1] == list(wrapped) and len(sampler) == len(wrapped)
        # a mid-epoch resume skips this rank's own first samples, once; the length stays the epoch's
        sampler.start_at(2, 2)
        assert list(sampler) == shares[-1][2:] and len(sampler) == len(shares[-1])
        assert list(sampler) == shares[-1]
    assert len({len(share) for share in shares}) == 1  # equal lengths: every rank takes every step
    assert sorted({tuple(item) for share in shares for item in share}) == sorted(map(tuple, order))  # complete
    padding = len(shares[0]) * world - n  # wrapped around to equal lengths: only that many repeats
    assert sum(len(share) for share in shares) - len({tuple(i) for s in shares for i in s}) == padding


def test_cache_decodes_each_image_once_and_gives_the_same_batches(tmp_path, monkeypatch):
    from conftest import write_image_folder

    import vit.data.cache as cache_module
    import vit.data.folder as folder
    root = write_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=6)
    decoded = []
    real = load_image
    monkeypatch.setattr(cache_module, "load_image", lambda p, c: decoded.append(p) or real(p, c))
    monkeypatch.setattr(folder, "load_image", lambda p, c: decoded.append(p) or real(p, c))
    batches = {}
    for cache in (False, True):
        decoded.clear()
        dm = ImageDataModule("imagefolder", root=str(root), img_size=16, batch_size=4, cache=cache, seed=3,
                             augment="strong")
        dm.setup("fit")
        batches[cache] = _training_batches(dm, epochs=(0, 1))
        # without the cache: every image decoded every epoch; with it: each once, when set up
        assert len(decoded) == (24 if cache else 2 * 12)
    assert len(batches[True]) == len(batches[False]) > 0
    for (x0, y0), (x1, y1) in zip(batches[False], batches[True]):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)  # same samples, same augmentation


def test_cache_refuses_a_dataset_that_would_not_fit(tmp_path):
    from PIL import Image

    from vit.data.cache import DecodedImages
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="data.cache: decoding 1 images needs .* set data.cache: false"):
        DecodedImages.decode([str(tmp_path / "a.png")], available=20_000)


def test_cache_reports_files_that_fail_to_decode_and_leaves_them_empty(tmp_path):
    from vit.data.cache import DecodedImages
    from vit.data.images import BadImageError
    Image.new("L", (4, 2), 7).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    reported = []
    cache = DecodedImages.decode([str(tmp_path / "bad.png"), str(tmp_path / "ok.png")], in_chans=3,
                                 on_bad=reported.append)
    assert cache[0] is None and cache[1].shape == (2, 4, 3) and int(cache[1].max()) == 7
    assert len(reported) == 1 and reported[0].path.endswith("bad.png")
    with pytest.raises(BadImageError, match="bad.png"):
        DecodedImages.decode([str(tmp_path / "bad.png")])


def _share_between_threads(paths, name, **kwargs):
    """Two "processes" of one node as threads (leader first): each one's cache, or the exception it raised."""
    import threading

    from vit.data.cache import DecodedImages, NodeShare
    barrier, results = threading.Barrier(2, timeout=60), {}

    def run(leader):
        try:
            results[leader] = DecodedImages.decode(paths, share=NodeShare(name, leader, barrier.wait), **kwargs)
        except Exception as err:  # noqa: BLE001 — the test looks at it
            results[leader] = err

    threads = [threading.Thread(target=run, args=(leader,)) for leader in (True, False)]
    [t.start() for t in threads], [t.join() for t in threads]
    return results[True], results[False]


def _left_behind(name):
    from vit.data.cache import _shared_folders
    return [p for folder in _shared_folders() for p in folder.iterdir() if name in p.name]


def test_cache_shared_by_a_node_is_decoded_once_and_mapped_by_the_others(tmp_path, monkeypatch):
    import os

    import vit.data.cache as cache_module
    from vit.data.cache import DecodedImages
    root = write_image_folder(tmp_path / "images", per_class=3, size=12, splits=("",))
    paths = sorted(str(p) for p in root.rglob("*.png"))
    decoded = []
    monkeypatch.setattr(cache_module, "load_image", lambda p, c: decoded.append(p) or load_image(p, c))
    name = f"vit-cache-test{os.getpid()}"
    leader, follower = _share_between_threads(paths, name)
    assert len(decoded) == len(paths)  # the leader alone decoded
    private = DecodedImages.decode(paths)
    for cache in (leader, follower):  # both read-only mappings of the one file, with the private decode's pixels
        assert isinstance(cache.buffer, np.memmap) and not cache.buffer.flags.writeable
        assert all(np.array_equal(cache[i], private[i]) for i in range(len(paths)))
    assert leader.buffer.filename == follower.buffer.filename and not _left_behind(name)  # unlinked once mapped


def test_cache_shared_by_a_node_names_the_leaders_failure_to_the_others(tmp_path):
    import os

    from vit.data.images import BadImageError
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    name = f"vit-cache-test{os.getpid()}"
    leader, follower = _share_between_threads([str(tmp_path / "bad.png")], name)  # on_bad_image: error
    assert isinstance(leader, BadImageError)  # and the other process does not wait for ever:
    assert isinstance(follower, RuntimeError) and "data.cache: the node's first process did not" in str(follower)
    assert not _left_behind(name)


def test_cache_refuses_a_node_copy_that_would_not_fit(tmp_path):
    from vit.data.cache import DecodedImages, NodeShare
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    alone = NodeShare("vit-cache-test", leader=True, barrier=lambda: None)
    with pytest.raises(ValueError, match=r"data.cache: decoding 1 images needs 0.00 GiB \(one copy for all processes "
                                         r"on this node\), more than 50% of the 0.00 GiB of memory available"):
        DecodedImages.decode([str(tmp_path / "a.png")], available=20_000, share=alone)


DDP_CACHE_SCRIPT = """
import hashlib, json, os, sys, warnings
import lightning as L
import vit.data.cache as cache_module
from vit.data import ImageDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ImageClassifier

decoded = []  # every image this process decoded for the cache
real = cache_module.load_image
cache_module.load_image = lambda path, in_chans: decoded.append(path) or real(path, in_chans)

class Record(L.Callback):
    def on_fit_start(self, trainer, module):  # after setup: the caches are built
        data = trainer.datamodule.train_set
        buffer = data.decoded.buffer
        file = str(getattr(buffer, "filename", None) or "")  # a memmap's: the file it maps
        name = os.path.basename(file) or "private"
        with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"decoded": len(decoded), "file": file, "exists": os.path.exists(file),
                       # device and inode of every mapping of the file: the same in both processes if they share it
                       "mapped": sorted({" ".join(line.split()[3:5]) for line in open("/proc/self/maps")
                                         if name in line}),
                       "sha": hashlib.sha1(buffer.tobytes()).hexdigest(), "paths": [p for p, _ in data.samples]}, f)

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    dm = ImageDataModule("imagefolder", root=sys.argv[2], img_size=16, batch_size=4, cache=True)
    module = ImageClassifier(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                             num_classes=dm.num_classes)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=sys.argv[1], callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
"""


@pytest.mark.slow
def test_ddp_processes_on_a_node_share_one_decoded_copy(tmp_path):
    import hashlib
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vit.data.cache import DecodedImages
    root = write_image_folder(tmp_path / "images", per_class=6, size=16)  # train/ and val/: two caches
    script = tmp_path / "ddp_cache.py"
    script.write_text(DDP_CACHE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(root)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["decoded"] for r in ranks] == [24, 0]  # rank 0 decoded train and val; rank 1 nothing
    # rank 1 maps the very file rank 0 wrote (same device and inode), unlinked once both had mapped it
    assert ranks[0]["file"] == ranks[1]["file"] and ranks[0]["mapped"] == ranks[1]["mapped"] != []
    assert not ranks[0]["exists"] and not ranks[1]["exists"]
    private = DecodedImages.decode(ranks[0]["paths"])  # and holds the pixels a private decode gives
    assert ranks[0]["sha"] == ranks[1]["sha"] == hashlib.sha1(private.buffer.tobytes()).hexdigest()
    run = Path(ranks[0]["file"]).name.split("-node")[0]  # this run's files, temporary ones included: none left
    assert run.startswith("vit-cache-") and not _left_behind(run)
