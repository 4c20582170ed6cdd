"""Hugging Face datasets as a source (``data.dataset: hf``): small datasets built here, saved with save_to_disk and
as parquet, read through ImageDataModule, a Trainer and the CLI; all offline."""
import io
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from conftest import QUICK, assert_loss_fell, logged_losses
from PIL import Image

from vit.data import ImageDataModule
from vit.data.images import BadImageError
from vit.tasks.backbone import Backbone

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    # datasets converts parquet folders into its cache: keep that inside the test's folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    # a stream of parquet shards waits this long after each pass (an Arrow threading workaround): not in tests
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _png(seed, mode="RGB", size=(20, 14), label=None):
    """Noise; with a ``label``, the label's third of the image (left, middle, right) bright: learnable."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if mode in ("RGB", "RGBA") else ())
    pixels = rng.integers(0, 128 if label is not None else 255, shape, dtype=np.uint8)
    if label is not None:
        third = size[0] // 3
        pixels[:, label * third:(label + 1) * third] = 250
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG")
    return buf.getvalue()


def make_split(n, start=0, bad=(), modes=None):
    """n distinct images; label i % 3 (a bright third of the image); an id column (ignored) first; ``bad`` positions
    hold garbage bytes."""
    images = [{"bytes": b"not an image" if i in bad else _png(start + i, (modes or {}).get(i, "RGB"), label=i % 3),
               "path": None} for i in range(n)]
    features = datasets.Features({"id": datasets.Value("int64"), "picture": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"id": list(range(start, start + n)), "picture": images,
                                       "kind": [i % 3 for i in range(n)]}, features=features)


@pytest.fixture
def saved(tmp_path):
    """save_to_disk: train (24) and test (6), no validation split."""
    root = tmp_path / "saved"
    datasets.DatasetDict(train=make_split(24), test=make_split(6, start=100)).save_to_disk(str(root))
    return root


@pytest.fixture
def parquet(tmp_path):
    """A parquet folder as the hub stores them: train (24), valid (8), test (6)."""
    root = tmp_path / "parquet"
    (root / "data").mkdir(parents=True)
    for name, split in (("train", make_split(24)), ("valid", make_split(8, start=50)),
                        ("test", make_split(6, start=100))):
        split.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


def test_saved_dataset_gives_class_names_carved_val_and_batches(saved):
    dm = ImageDataModule("hf", root=str(saved), img_size=16, batch_size=4, val_fraction=0.25)
    assert dm.class_names == CLASSES and dm.num_classes == 3  # from the ClassLabel feature, before loading
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 6)
    train, val = set(dm.train_set.indices.tolist()), set(dm.val_set.indices.tolist())
    assert not train & val and train | val == set(range(24))
    again = ImageDataModule("hf", root=str(saved), img_size=16, val_fraction=0.25)
    again.setup("fit")
    assert np.array_equal(again.val_set.indices, dm.val_set.indices)  # seeded
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    # labels are the samples' own: the label column at the sampled indices
    order = [i for i, _ in dm.train_dataloader().sampler][:4]
    assert labels.tolist() == [int(dm.train_set.indices[i]) % 3 for i in order]


def test_parquet_folder_and_split_names(parquet):
    dm = ImageDataModule("hf", root=str(parquet), img_size=16, batch_size=4, split_names={"val": "valid"})
    assert dm.class_names == CLASSES
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 8, 6)
    assert dm.val_set.name == "valid"
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 1, 2, 0]  # unshuffled


def test_keys_and_channels(tmp_path):
    root = tmp_path / "modes"
    make_split(6, modes={0: "L", 1: "RGBA", 2: "L"}).save_to_disk(str(root))  # one Dataset: the train split
    dm = ImageDataModule("hf", root=str(root), img_size=16, image_key="picture", label_key="kind", augment="none",
                         val_fraction=0.0)
    dm.setup("fit")
    assert all(dm.train_set[i][0].shape == (3, 16, 16) for i in range(6))
    gray = ImageDataModule("hf", root=str(root), img_size=16, in_chans=1, val_fraction=0.0)
    gray.setup("fit")
    assert all(gray.train_set[i][0].shape == (1, 16, 16) for i in range(6))


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_key="photo"), "data.image_key: .* no column 'photo'"),
    (dict(label_key="id"), "data.label_key: column 'id' .* Value, expected ClassLabel"),
    (dict(image_key="kind"), "data.image_key: column 'kind' .* expected Image"),
    (dict(split_names={"val": "dev"}), "data.split_names.val: .* no split 'dev'"),
    (dict(split_names={"valid": "test"}), "data.split_names: unknown key"),
])
def test_bad_keys_name_the_key(saved, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule("hf", root=str(saved), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="hf"), "data.root: required for dataset 'hf'"),
    (dict(dataset="hf", root="/nonexistent/dataset"), "not a directory"),
    (dict(dataset="digits", streaming=True), "data.streaming: only read by dataset 'hf'"),
    (dict(dataset="digits", image_key="img"), "data.image_key: only read by dataset 'hf'"),
])
def test_bad_hf_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


def test_undecodable_images_are_skipped_or_raise(tmp_path):
    root = tmp_path / "bad"
    datasets.DatasetDict(train=make_split(12, bad={3, 4}), validation=make_split(3, start=40)).save_to_disk(str(root))
    dm = ImageDataModule("hf", root=str(root), img_size=16, batch_size=4)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=r"train\[3\]"):
        image, label = dm.train_set[3]  # 3 and 4 are garbage: 5 takes their place, with its own label
    assert image.shape == (3, 16, 16) and label == 5 % 3
    strict = ImageDataModule("hf", root=str(root), img_size=16, batch_size=4, on_bad_image="error")
    strict.setup("fit")
    with pytest.raises(BadImageError, match=r"train\[4\].*on_bad_image"):
        strict.train_set[4]


def test_unlabelled_test_split_falls_back_to_val(tmp_path):
    root = tmp_path / "unlabelled"
    test = make_split(4, start=70).cast_column("kind", datasets.Value("int64")).map(lambda row: {"kind": -1})
    test = test.cast_column("kind", datasets.ClassLabel(names=CLASSES))
    datasets.DatasetDict(train=make_split(12), test=test).save_to_disk(str(root))
    dm = ImageDataModule("hf", root=str(root), img_size=16, val_fraction=0.25)
    with pytest.warns(UserWarning, match="unlabelled"):
        dm.setup("fit")
    assert dm.test_set is dm.val_set


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    return [(x.clone(), y.clone()) for x, y in loader]


def test_streaming_is_iterable_carves_val_by_hash_and_reshuffles(parquet, tmp_path):
    # a parquet folder without a validation split: train only
    (parquet / "data" / "valid-00000-of-00001.parquet").unlink()
    dm = ImageDataModule("hf", root=str(parquet), img_size=16, batch_size=4, streaming=True, val_fraction=0.3,
                         seed=1)
    assert dm.class_names == CLASSES
    with pytest.warns(UserWarning, match="no validation split; while streaming, validation reads"):
        dm.setup("fit")
    assert isinstance(dm.train_set, torch.utils.data.IterableDataset)
    loader = dm.train_dataloader()
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    train_n = sum(len(y) for _, y in first)
    val = [(x, y) for x, y in dm.val_dataloader()]
    val_n = sum(len(y) for _, y in val)
    assert train_n + val_n == 24 and 0 < val_n < 24  # every example in exactly one of the two
    assert sum(len(y) for _, y in second) == train_n
    # reshuffled: each epoch streams the same training examples in a new order, drawn from (seed, epoch)
    labels = [torch.cat([y for _, y in epoch]) for epoch in (first, second)]
    assert not torch.equal(labels[0], labels[1])
    plain = ImageDataModule("hf", root=str(parquet), img_size=16, batch_size=4, streaming=True, val_fraction=0.3,
                            seed=1, augment="none")  # without augmentation an image tells which example it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.setup("fit")
    epochs = [_epoch(plain.train_dataloader(), epoch) for epoch in (0, 1)]
    images = [torch.cat([x for x, _ in epoch]) for epoch in epochs]
    assert [torch.cat([y for _, y in epoch]).tolist() for epoch in epochs] == [y.tolist() for y in labels]
    assert sorted(x.numpy().tobytes() for x in images[0]) == sorted(x.numpy().tobytes() for x in images[1])
    assert not torch.equal(images[0], images[1])
    again = ImageDataModule("hf", root=str(parquet), img_size=16, batch_size=4, streaming=True, val_fraction=0.3,
                            seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.setup("fit")
    repeat = _epoch(again.train_dataloader(), 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(second, repeat))  # seeded
    test_n = sum(len(y) for _, y in dm.test_dataloader())
    assert test_n == 6


@pytest.mark.parametrize("streaming", [False, True])
def test_augmentation_does_not_depend_on_num_workers(saved, streaming):
    def batches(num_workers):
        dm = ImageDataModule("hf", root=str(saved), img_size=16, batch_size=4, augment="strong", seed=3,
                             streaming=streaming, num_workers=num_workers, val_fraction=0.0)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [pair for epoch in (0, 1) for pair in _epoch(loader, epoch)]
    serial, parallel = batches(0), batches(2)
    if streaming:  # workers interleave the stream's shards: the same images, in another order
        serial, parallel = (sorted((x.numpy().tobytes(), int(y)) for xs, ys in run for x, y in zip(xs, ys))
                            for run in (serial, parallel))
        assert serial == parallel
    else:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel))


def test_streaming_shards_between_processes_in_equal_shares(saved):
    from vit.data.hf import HFSource
    source = HFSource(str(saved), streaming=True)

    def shares(val_fraction):
        out = []
        for rank in range(2):
            train, _, _ = source.datasets(None, None, carve=None, val_fraction=val_fraction, seed=0, num_replicas=2,
                                          rank=rank)
            out.append([image.tobytes() for image, _ in train])  # no transform: the decoded images
        return out
    whole = shares(0.0)
    assert [len(s) for s in whole] == [12, 12] and len(set(whole[0]) | set(whole[1])) == 24  # disjoint halves
    # holding out val by hash leaves the processes unequal shares of train: each is padded or cut to 24 * 0.75 / 2
    with pytest.warns(UserWarning, match="no validation split"):
        carved = shares(0.25)
    assert [len(s) for s in carved] == [9, 9]


@pytest.mark.parametrize("streaming", [False, True])
def test_trains_a_few_steps_with_a_trainer(saved, streaming, tmp_path):
    from vit.tasks.classification import ImageClassifier
    dm = ImageDataModule("hf", root=str(saved), img_size=16, batch_size=4, streaming=streaming)
    module = ImageClassifier(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                             num_classes=dm.num_classes, class_names=dm.class_names)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6
    if streaming:  # Lightning's set_epoch reached the stream (its shuffle and augmentation seeds)
        assert dm.train_set.data.epoch == 1


def test_cli_fit_from_a_parquet_folder(parquet, tmp_path, monkeypatch):
    from vit.tasks.classification import ImageClassifier
    from vit.training.cli import DEFAULT_CONFIG, main
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = main(["fit", "--config", str(DEFAULT_CONFIG.parent / "imagefolder.yaml"), "--data.dataset", "hf",
                    "--data.root", str(parquet), "--data.split_names", "{val: valid}", *QUICK,
                    "--trainer.max_epochs", "6", "--trainer.limit_train_batches", "null",
                    "--trainer.log_every_n_steps", "1", "--data.augment", "none", "--model.warmup_epochs", "0"])
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    restored = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.class_names == CLASSES and restored.model.num_classes == 3
    assert_loss_fell(logged_losses(app))  # it learned from the parquet rows (a bright third per class)


@pytest.mark.slow
def test_ddp_two_processes_stream_equal_shares(tmp_path):
    from test_data_streaming import run_ddp  # the same two-process script as for litdata shards
    root = tmp_path / "ddp"
    datasets.DatasetDict(train=make_split(24), validation=make_split(7, start=60)).save_to_disk(str(root))
    ranks = run_ddp(tmp_path, "hf", root)
    # 24 training examples streamed as 12 per process (4 batches of 3), 2 epochs; 7 val examples padded to 4 each
    assert ranks[0]["step"] == ranks[1]["step"] == 2 * 4
    for epoch in range(2):
        seen = [label for r in ranks for batch in r["labels"][epoch * 4:(epoch + 1) * 4] for label in batch]
        assert sorted(seen) == sorted(i % 3 for i in range(24))
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"] != -1  # validation ran on both, synced
