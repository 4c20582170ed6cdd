import numpy as np
import pytest
import torch
from PIL import Image

from vit.data import ImageDataModule, eval_transform, load_image, train_transform
from conftest import write_image_folder


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
    assert dm.test_set is dm.val_set or len(dm.test_set) == len(dm.val_set)  # val doubles as test
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="mnist"), "data.dataset"),
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
    import vit.data.cache as cache_module
    import vit.data.folder as folder
    from conftest import write_image_folder
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
