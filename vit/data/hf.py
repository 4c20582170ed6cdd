"""Hugging Face datasets (``data.dataset: hf``): a hub name or a local ``save_to_disk``/parquet directory, read
as map-style datasets (the usual seeded sampler) or, with ``data.streaming: true``, as a stream sharded per process.

Images are kept encoded (``Image(decode=False)``) and decoded here with :func:`vit.data.images.load_image`, so
channels, EXIF rotation and bad files are handled exactly as for image folders. ``datasets`` itself is imported
lazily: constructing a data module for another source does not pay for it.

``stream_seed`` (and ``decode_image`` / ``SkipLog`` from images.py) are shared with the litdata reader
in ``streaming.py``.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .images import BadImageError, SkipLog, decode_image
from .sampling import seed_transform, split_index

SPLIT_KEYS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
SHUFFLE_BUFFER = 1000  # examples held by a stream's shuffle buffer (per loader worker)
MAX_STREAM_SHARDS = 64  # a local dataset streamed from disk is cut into this many shards (loader workers x ranks)


# ---- encoded images, shared with streaming.py -------------------------------------------------------------------
def stream_seed(*parts: int) -> int:
    """A sample's augmentation seed from integers (seed, epoch, the sample's identity), the same in any worker.

    Example:
        >>> stream_seed(0, 1, 2) == stream_seed(0, 1, 2) != stream_seed(0, 2, 2)
        True
    """
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def apply_transform(transform: Callable | None, image: np.ndarray, sample_seed: int | None):
    if transform is None:
        return image
    if sample_seed is not None:
        seed_transform(transform, sample_seed)
    return transform(image=image)["image"]


# ---- opening a dataset ------------------------------------------------------------------------------------------
def is_local_dataset(root: str) -> bool:
    """True when ``root`` names a local directory (else it is a hub name such as ``beans``)."""
    return Path(root).expanduser().is_dir()


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class HFSource:
    """A Hugging Face dataset ready for training: its splits (train/val/test -> the dataset's names), the image and
    label columns, and the class names of the label's ``ClassLabel`` feature.

    Cheap to construct (the data module needs the class names before anything is loaded): a local dataset is
    memory-mapped, a hub dataset is only described (``load_dataset_builder``); ``split()`` loads, downloading a
    hub dataset into ``cache_dir`` (the ``datasets`` cache by default) on first use, or opens it as a stream.
    """

    def __init__(self, root: str, image_key: str | None = None, label_key: str | None = None,
                 split_names: Mapping[str, str] | None = None, streaming: bool = False,
                 cache_dir: str | None = None):
        self.root, self.streaming, self.cache_dir = str(root), streaming, cache_dir
        self._data: Any = None  # DatasetDict, IterableDatasetDict or {"train": Dataset}, once loaded
        features, available = self._describe()
        self.image_key, self.label_key = pick_columns(features, image_key, label_key, self.root)
        self.class_names = list(features[self.label_key].names)
        self.splits = resolve_splits(available, split_names, self.root)

    def _describe(self) -> tuple[Any, list[str]]:
        """(features, split names) without loading the data where the dataset allows it."""
        import datasets
        path = Path(self.root).expanduser()
        if path.is_dir() and _saved_to_disk(path):
            self._data = _load_from_disk(path)
        elif self.streaming:
            self._data = _call(datasets.load_dataset, self.root, streaming=True, cache_dir=self.cache_dir)
        else:
            builder = _call(datasets.load_dataset_builder, self.root, cache_dir=self.cache_dir)
            if builder.info.features is not None and builder.info.splits:
                return builder.info.features, list(builder.info.splits)
            self._data = self._load()
        first = next(iter(self._data.values()))
        features = first.features
        if features is None:  # a stream whose card does not list its features: read them from the first example
            features = first._resolve_features().features
        return features, list(self._data)

    def _load(self):
        import datasets
        return _call(datasets.load_dataset, self.root, cache_dir=self.cache_dir)

    def split(self, name: str):
        """The split called ``name`` (a dataset name, e.g. ``validation``): a map-style ``datasets.Dataset``, or an
        ``IterableDataset`` when streaming; images left encoded, only the image and label columns."""
        import datasets
        if self._data is None:
            self._data = self._load()
        data = self._data[name]
        if self.streaming and isinstance(data, datasets.Dataset):  # a local dataset, streamed from disk
            data = data.to_iterable_dataset(num_shards=max(1, min(len(data), MAX_STREAM_SHARDS)))
        data = data.select_columns([self.image_key, self.label_key])
        return data.cast_column(self.image_key, datasets.Image(decode=False))

    def num_examples(self, name: str) -> int | None:
        """The number of examples of split ``name`` where the dataset records it (a stream may not)."""
        import datasets
        data = self._data[name] if self._data is not None else None
        if isinstance(data, datasets.Dataset):
            return len(data)
        splits = getattr(getattr(data, "info", None), "splits", None)
        if not splits:
            try:
                splits = _call(datasets.load_dataset_builder, self.root, cache_dir=self.cache_dir).info.splits
            except ValueError:
                splits = None
        if not splits or name not in splits:
            return None
        return splits[name].num_examples or None

    def datasets(self, train_tf: Callable, eval_tf: Callable, *, carve: Callable, val_fraction: float, seed: int,
                 in_chans: int = 3, on_bad_image: str = "error", num_replicas: int = 1, rank: int = 0) -> tuple:
        """(train, val, test) datasets. Without a val split, validation is carved out of train: by ``carve(n)`` ->
        (train indices, val indices) for a map-style dataset, by hash (see ``HFStream``) for a stream. Without a
        test split (or with an unlabelled one, as ImageNet's), val doubles as test."""
        names = self.splits
        common = dict(image_key=self.image_key, label_key=self.label_key, in_chans=in_chans,
                      on_bad_image=on_bad_image)
        if self.streaming:
            return self._streams(train_tf, eval_tf, val_fraction=val_fraction, seed=seed, num_replicas=num_replicas,
                                 rank=rank, **common)
        data = self.split(names["train"])
        if names["val"] is None:
            train_idx, val_idx = carve(len(data))
            train = HFDataset(data, transform=train_tf, indices=train_idx, name=names["train"], **common)
            val = HFDataset(data, transform=eval_tf, indices=val_idx, name=names["train"], **common)
        else:
            train = HFDataset(data, transform=train_tf, name=names["train"], **common)
            val = HFDataset(self.split(names["val"]), transform=eval_tf, name=names["val"], **common)
        if len(train) == 0:
            raise ValueError(f"data.root: the {names['train']!r} split of {self.root} has no examples for training")
        test = val
        if names["test"] is not None:
            test = HFDataset(self.split(names["test"]), transform=eval_tf, name=names["test"], **common)
            if len(test) and test.labels.min() < 0:  # ClassLabel -1: no label (ImageNet's test split)
                warnings.warn(f"data: the {names['test']!r} split of {self.root} is unlabelled; the validation "
                              f"split is used for testing", stacklevel=2)
                test = val
        return train, val, test

    def _streams(self, train_tf, eval_tf, *, val_fraction: float, seed: int, num_replicas: int, rank: int,
                 **common) -> tuple:
        """(train, val, test) streams. With several processes each gets the same number of examples of every split
        (its share of the split's recorded size, rounded up), so none waits for another's step."""
        names = self.splits
        carved = names["val"] is None
        if carved and val_fraction > 0:
            warnings.warn(f"data: {self.root} has no validation split; while streaming, validation reads the "
                          f"training stream to find its held-out {val_fraction:.0%} (name a split with "
                          f"data.split_names, or limit trainer.limit_val_batches)", stacklevel=3)
        sizes = {key: self.num_examples(names[key]) if names[key] and num_replicas > 1 else None for key in SPLIT_KEYS}
        if carved and sizes["train"] is not None:
            sizes["val"] = int(round(sizes["train"] * val_fraction))
            sizes["train"] -= sizes["val"]
        unknown = [names[key] for key, size in sizes.items() if num_replicas > 1 and names[key] and size is None]
        if unknown:
            warnings.warn(f"data: the size of split(s) {unknown} of {self.root} is not recorded, so the processes "
                          f"may get unequal numbers of batches and stall; set trainer.limit_train_batches / "
                          f"limit_val_batches", stacklevel=3)

        def stream(key, split_key, transform, shuffle=False, hold_out=None):
            size = sizes[key]
            return HFStream(self.split(names[split_key]), transform=transform, shuffle=shuffle, seed=seed,
                            num_replicas=num_replicas, rank=rank, hold_out=hold_out, name=names[split_key],
                            length=None if size is None else -(-size // num_replicas), **common)
        train = stream("train", "train", train_tf, shuffle=True, hold_out=(val_fraction, False) if carved else None)
        val = stream("val", "train", eval_tf, hold_out=(val_fraction, True)) if carved else \
            stream("val", "val", eval_tf)
        return train, val, stream("test", "test", eval_tf) if names["test"] else val


def _load_from_disk(path: Path):
    import datasets
    data = _call(datasets.load_from_disk, str(path))
    return data if isinstance(data, datasets.DatasetDict) else {"train": data}  # one saved Dataset: training data


def _call(fn, root, **kwargs):
    """``datasets`` loaders, with a failure that names ``data.root``."""
    try:
        return fn(root, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        hint = "" if is_local_dataset(root) else " (a hub dataset: is the name right, and the hub reachable?)"
        raise ValueError(f"data.root: cannot open Hugging Face dataset {root!r}{hint}: "
                         f"{type(err).__name__}: {err}") from err


def pick_columns(features, image_key: str | None, label_key: str | None, root: str) -> tuple[str, str]:
    """The image and label columns: as named, or the first ``Image`` and the first ``ClassLabel`` feature.

    Example:
        >>> from datasets import ClassLabel, Features, Image, Value
        >>> pick_columns(Features(id=Value("int64"), img=Image(), label=ClassLabel(names=["a", "b"])), None, None, "x")
        ('img', 'label')
    """
    from datasets import ClassLabel, Image
    columns = {key: type(feature).__name__ for key, feature in features.items()}
    keys = []
    for what, key, kind in (("image", image_key, Image), ("label", label_key, ClassLabel)):
        if key is None:
            found = [k for k, feature in features.items() if isinstance(feature, kind)]
            if not found:
                raise ValueError(f"data.{what}_key: {root} has no {kind.__name__} column (columns: {columns}); "
                                 f"name the {what} column")
            key = found[0]
        elif key not in features:
            raise ValueError(f"data.{what}_key: {root} has no column {key!r} (columns: {columns})")
        elif not isinstance(features[key], kind):
            extra = (" without class names; cast it first, e.g. dataset.cast_column"
                     f"({key!r}, ClassLabel(names=[...]))" if what == "label" else "")
            raise ValueError(f"data.{what}_key: column {key!r} of {root} is {columns[key]}, expected "
                             f"{kind.__name__}{extra}")
        keys.append(key)
    return keys[0], keys[1]


def resolve_splits(available: Sequence[str], split_names: Mapping[str, str] | None, root: str) -> dict:
    """``{"train": name, "val": name or None, "test": name or None}``: ``split_names`` where given, else ``train``,
    ``validation`` or ``val``, and ``test`` where the dataset has them.

    Example:
        >>> resolve_splits(["train", "validation"], None, "beans")
        {'train': 'train', 'val': 'validation', 'test': None}
    """
    split_names = dict(split_names or {})
    unknown = sorted(set(split_names) - set(SPLIT_KEYS))
    if unknown:
        raise ValueError(f"data.split_names: unknown key(s) {unknown}; expected some of {list(SPLIT_KEYS)}")
    chosen = {}
    for key in SPLIT_KEYS:
        if key in split_names:
            name = split_names[key]
            if name not in available:
                raise ValueError(f"data.split_names.{key}: {root} has no split {name!r} (splits: {list(available)})")
            chosen[key] = name
        else:
            chosen[key] = next((name for name in DEFAULT_SPLITS[key] if name in available), None)
    if chosen["train"] is None:
        raise ValueError(f"data.split_names: {root} has no 'train' split (splits: {list(available)}); "
                         f"map one with data.split_names: {{train: <name>}}")
    return chosen


# ---- map-style ------------------------------------------------------------------------------------------------
class HFDataset(Dataset):
    """A map-style split (optionally a subset by index) yielding (transformed image, label). A sample that fails to
    decode raises ``BadImageError`` with ``on_bad_image="error"``; with ``"skip"`` the next sample takes its place
    (with its own label), as in :class:`vit.data.folder.FileDataset`."""

    def __init__(self, data, image_key: str, label_key: str, transform: Callable | None = None, in_chans: int = 3,
                 indices: Sequence[int] | None = None, on_bad_image: str = "error",
                 skip_log: str | Path | None = None, name: str = "train"):
        self.data, self.image_key, self.label_key = data, image_key, label_key
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.transform, self.in_chans, self.on_bad_image, self.name = transform, in_chans, on_bad_image, name
        self.skips = SkipLog(skip_log)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label (read from the label column alone)."""
        return np.asarray(self.data[self.label_key], dtype=np.int64)[self.indices]

    def __getitem__(self, i):
        i, sample_seed = split_index(i)
        for attempt in range(min(len(self.indices), 16)):
            j = int(self.indices[(i + attempt) % len(self.indices)])
            row = self.data[j]
            try:
                image = decode_image(_encoded(row[self.image_key]), self.in_chans, f"{self.name}[{j}]")
                break
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise BadImageError(err.path, f"{err.reason}; set data.on_bad_image: skip to leave such "
                                                  f"images out") from None
                self.skips.record(err)
        else:
            raise BadImageError(f"{self.name}[{int(self.indices[i])}]", "this and the following samples could not "
                                                                        "be decoded")
        return apply_transform(self.transform, image, sample_seed), int(row[self.label_key])


def _encoded(value) -> bytes | str | None:
    """An ``Image(decode=False)`` cell: ``{"bytes": ..., "path": ...}`` -> the bytes, else the file path."""
    if not isinstance(value, Mapping):
        return None
    return value.get("bytes") or value.get("path")


# ---- streaming ------------------------------------------------------------------------------------------------
class HFStream(IterableDataset):
    """A streamed split yielding (transformed image, label): the stream is shuffled (shards, then a buffer) from
    ``(seed, epoch)`` for training, split between processes by ``split_dataset_by_node`` and between loader workers
    by ``datasets`` itself. Each image's augmentation is seeded by (seed, epoch, a hash of its bytes), so it does not
    depend on which worker decodes it.

    ``hold_out=(fraction, keep)`` carves a validation set out of a split without one: an example is held out when
    the hash of its bytes (with ``seed``) falls below ``fraction``, which is the same in every epoch, order and
    process; ``keep=False`` streams the rest (training), ``keep=True`` only the held-out part (validation).
    Undecodable images are skipped (``on_bad_image="skip"``) or raise ``BadImageError``.

    ``length`` (for several processes): this process yields exactly that many examples per epoch, shared between
    its loader workers, going round its shards again where they hold fewer (as ``DistributedSampler`` pads), so
    every process takes the same number of steps.
    """

    def __init__(self, data, image_key: str, label_key: str, transform: Callable | None = None, in_chans: int = 3,
                 shuffle: bool = False, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 hold_out: tuple[float, bool] | None = None, length: int | None = None,
                 on_bad_image: str = "error", skip_log: str | Path | None = None, name: str = "train"):
        from datasets.distributed import split_dataset_by_node
        if shuffle:
            data = data.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)  # same seed on every rank: shards agree
        if num_replicas > 1:
            data = split_dataset_by_node(data, rank=rank, world_size=num_replicas)
        self.data, self.image_key, self.label_key = data, image_key, label_key
        self.transform, self.in_chans, self.seed, self.hold_out = transform, in_chans, seed, hold_out
        self.shuffle, self.on_bad_image, self.name, self.length = shuffle, on_bad_image, name, length
        self.skips = SkipLog(skip_log)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)  # shared with persistent loader workers (a shared-memory tensor in datasets)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        if self.hold_out == (0.0, True):
            return  # nothing is held out: don't read the stream to find it
        if self.length is None:
            yield from self._one_pass(0)
            return
        share, done, repeat = _worker_share(self.length), 0, 0
        while done < share:
            before = done
            for sample in self._one_pass(repeat):
                yield sample
                done += 1
                if done == share:
                    return
            if done == before:
                return  # no shards for this worker (fewer shards than workers): the same in every process
            repeat += 1

    def _one_pass(self, repeat: int) -> Iterator[tuple[Any, int]]:
        epoch = self.data.epoch
        for position, row in enumerate(self.data):
            encoded = _encoded(row[self.image_key])
            key = _content_key(encoded, self.seed)
            if self.hold_out is not None:
                fraction, keep = self.hold_out
                if (key / 2**64 < fraction) != keep:
                    continue
            name = encoded if isinstance(encoded, str) else f"{self.name} example {position}"
            try:
                image = decode_image(encoded, self.in_chans, name)
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise BadImageError(err.path, f"{err.reason}; set data.on_bad_image: skip to leave such "
                                                  f"images out") from None
                self.skips.record(err)
                continue
            sample_seed = stream_seed(self.seed, epoch, key, repeat) if self.shuffle else None
            yield apply_transform(self.transform, image, sample_seed), int(row[self.label_key])

    def loader(self, batch_size: int, num_workers: int, drop_last: bool = False) -> DataLoader:
        """The split's DataLoader (no index sampler: the stream orders and shards itself)."""
        loader = DataLoader(self, batch_size=batch_size, num_workers=num_workers,
                            persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                            drop_last=drop_last)
        # Lightning calls set_epoch on a loader's sampler each epoch (with the right epoch after a resume); an
        # iterable dataset's loader only has a placeholder sampler, so it forwards the call to the stream.
        loader.sampler.set_epoch = self.set_epoch
        return loader


def _worker_share(total: int) -> int:
    """This loader worker's part of ``total`` examples (all of them in the main process)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return total
    return total // info.num_workers + int(info.id < total % info.num_workers)


def _content_key(encoded: bytes | str | None, seed: int) -> int:
    """A 64-bit hash of an image's bytes (or path) and ``seed``: its identity for hold-out and augmentation."""
    data = encoded.encode("utf-8", "surrogateescape") if isinstance(encoded, str) else (encoded or b"")
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little")
