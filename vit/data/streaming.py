"""litdata shards (``data.dataset: streaming``): an image folder converted by ``vit shards`` into
optimized chunks per split, read from a local folder or streamed from s3:// or gs:// through litdata's
``StreamingDataset`` (chunks cached under ``data.cache_dir``).

Layout of a converted folder::

    OUT/vit_dataset.json         class names, per split the sample count and per-class counts
    OUT/train/index.json, OUT/train/chunk-*.bin    (and val/, test/ when the source had them)

Each sample holds the original encoded file bytes, the label and the file's path relative to its split. Images are
decoded here as image folders decode them, then go through the same albumentations transforms; each image's
augmentation is seeded by (seed, epoch, sample index), so it does not depend on which loader worker reads it.
litdata shuffles (chunks, then samples within a window) from (seed, epoch) and shares the chunks out between
processes (read from ``torch.distributed``) and loader workers itself.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from litdata import StreamingDataLoader, StreamingDataset

from .hf import apply_transform, stream_seed
from .images import BadImageError, SkipLog, decode_image

META_FILE = "vit_dataset.json"
FORMAT = "vit.data.convert/1"  # the name of the writer when the format was defined; kept so old shards read
SPLITS = ("train", "val", "test")


class ShardError(RuntimeError):
    """A converted dataset that cannot be read: missing metadata, a missing or damaged chunk (named)."""


def is_remote(root: str) -> bool:
    return "://" in str(root)


def read_meta(root: str, storage_options: dict | None = None) -> dict:
    """The ``vit_dataset.json`` of a converted folder (local, or downloaded from an s3:// / gs:// URL)."""
    root = str(root).rstrip("/")
    where = f"{root}/{META_FILE}"
    try:
        if is_remote(root):
            from litdata.streaming.downloader import get_downloader
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, META_FILE)
                get_downloader(root, tmp, [], storage_options or {}).download_file(where, local)
                text = Path(local).read_text(encoding="utf-8")
        else:
            text = (Path(root).expanduser() / META_FILE).read_text(encoding="utf-8")
        meta = json.loads(text)
    except FileNotFoundError:
        raise ShardError(f"data.root: {where} not found; data.dataset 'streaming' reads a folder written by "
                         f"`vit shards SRC OUT` (was the conversion finished?)") from None
    except (OSError, ValueError) as err:
        raise ShardError(f"data.root: cannot read {where}: {type(err).__name__}: {err}") from err
    if meta.get("format") != FORMAT or "train" not in meta.get("splits", {}):
        raise ShardError(f"data.root: {where} is not the metadata of a `vit shards` folder "
                         f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def check_chunks(split_dir: Path) -> int:
    """The number of samples of a local converted split; every chunk its ``index.json`` lists must be there with
    the size it was written with (a missing or cut-off chunk is named here, not found by a stalled loader)."""
    index = split_dir / "index.json"
    try:
        chunks = json.loads(index.read_text(encoding="utf-8"))["chunks"]
    except FileNotFoundError:
        raise ShardError(f"data.root: {index} is missing (the split was not converted completely; run "
                         f"`vit shards` again)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"data.root: {index} is damaged ({type(err).__name__}: {err}); convert again") from err
    for chunk in chunks:
        path = split_dir / chunk["filename"]
        if not path.is_file():
            raise ShardError(f"data.root: chunk {path} is missing (listed in {index}); copy it again or convert "
                             f"again")
        size = path.stat().st_size
        if size != chunk["chunk_bytes"]:
            raise ShardError(f"data.root: chunk {path} is damaged: {size} bytes, {index} lists "
                             f"{chunk['chunk_bytes']}; copy it again or convert again")
    return sum(chunk["chunk_size"] for chunk in chunks)


class ShardSource:
    """A converted folder ready for training: class names from its metadata, its train/val/test splits."""

    def __init__(self, root: str, cache_dir: str | None = None, storage_options: dict | None = None):
        self.root = str(root).rstrip("/")
        if not is_remote(self.root):
            self.root = str(Path(self.root).expanduser())
        self.cache_dir, self.storage_options = cache_dir, storage_options
        self.meta = read_meta(self.root, storage_options)
        self.class_names = list(self.meta["classes"])

    def _split_dataset(self, split: str, transform, **kwargs) -> "ShardDataset":
        url = f"{self.root}/{split}"
        if not is_remote(url):
            count = check_chunks(Path(url))
            expected = self.meta["splits"][split]["count"]
            if count != expected:
                raise ShardError(f"data.root: {url}/index.json lists {count} samples, {META_FILE} says {expected}; "
                                 f"convert again")
        cache = os.path.join(self.cache_dir, split) if self.cache_dir else None
        return ShardDataset(url, transform, cache_dir=cache, storage_options=self.storage_options, name=split,
                            **kwargs)

    def datasets(self, train_tf: Callable, eval_tf: Callable, *, carve: Callable | None = None,
                 val_fraction: float, seed: int, in_chans: int = 3, on_bad_image: str = "error",
                 num_replicas: int = 1, rank: int = 0) -> tuple:
        """(train, val, test). Without a val split the last ``val_fraction`` of train is held out: the converter
        shuffled the files before writing, so that is a random sample, and reading it stays sequential. Without a
        test split val doubles as test. Processes and workers are shared out by litdata (``num_replicas`` and
        ``rank`` are read from ``torch.distributed`` there)."""
        splits = self.meta["splits"]
        common = dict(in_chans=in_chans, on_bad_image=on_bad_image, seed=seed)
        n = splits["train"]["count"]
        n_val = 0 if "val" in splits else int(round(n * val_fraction))
        if n - n_val <= 0:
            raise ValueError(f"data.root: no training samples in {self.root}/train")
        train = self._split_dataset("train", train_tf, shuffle=True, **common)
        if "val" in splits:
            val = self._split_dataset("val", eval_tf, **common)
        else:
            val = self._split_dataset("train", eval_tf, **common).subset(slice(n - n_val, n))
            train = train.subset(slice(0, n - n_val))
        test = self._split_dataset("test", eval_tf, **common) if "test" in splits else val
        return train, val, test


class ShardDataset(StreamingDataset):
    """One converted split as a litdata ``StreamingDataset`` yielding (transformed image, label).

    A sample that fails to decode raises ``BadImageError`` (``on_bad_image="error"``) or is left out of the stream
    (``"skip"``: the next one takes its place in the batch); either way it is named by split and file path.
    """

    def __init__(self, input_dir: str, transform: Callable | None = None, *, in_chans: int = 3,
                 on_bad_image: str = "error", seed: int = 0, shuffle: bool = False, cache_dir: str | None = None,
                 storage_options: dict | None = None, name: str = "train"):
        # Training: litdata's default (equal shares per process, so no process waits for another's step);
        # evaluation: every sample counted once (unequal shares are fine: metrics are gathered at epoch end).
        super().__init__(input_dir, cache_dir=cache_dir, shuffle=shuffle, seed=seed,
                         drop_last=None if shuffle else False, storage_options=storage_options or {})
        # not "transform": StreamingDataset applies an attribute of that name to the raw sample itself
        self.image_transform, self.in_chans, self.on_bad_image = transform, in_chans, on_bad_image
        self.name, self.skips = name, SkipLog()

    def __getitem__(self, index) -> Any:
        try:
            sample = super().__getitem__(index)
        except (BadImageError, KeyboardInterrupt):
            raise
        except Exception as err:  # litdata raises many kinds on a damaged or absent chunk: name the chunk
            raise ShardError(f"data.root: cannot read sample {getattr(index, 'index', index)} of "
                             f"{self.input_dir.url or self.input_dir.path} (chunk {self._chunk_name(index)}): "
                             f"{type(err).__name__}: {err}") from err
        name = f"{self.name}/{sample['path']}"
        try:
            image = decode_image(sample["image"], self.in_chans, name)
        except BadImageError as err:
            if self.on_bad_image != "skip":
                raise BadImageError(err.path, f"{err.reason}; set data.on_bad_image: skip to leave such images "
                                              f"out") from None
            self.skips.record(err)
            return None
        position = int(getattr(index, "index", index))
        sample_seed = stream_seed(self.seed, self.current_epoch, position) if self.shuffle else None
        return apply_transform(self.image_transform, image, sample_seed), int(sample["label"])

    def __next__(self) -> Any:
        while True:
            try:
                sample = super().__next__()
            except (StopIteration, BadImageError, ShardError):
                raise
            except Exception as err:  # e.g. a chunk whose header litdata finds damaged (it names the file)
                raise ShardError(f"data.root: cannot read {self.input_dir.url or self.input_dir.path}: "
                                 f"{type(err).__name__}: {err}") from err
            if sample is not None:  # None: an undecodable image, skipped
                return sample

    def _chunk_name(self, index) -> str:
        try:
            return self.subsampled_files[index.chunk_index]
        except (AttributeError, IndexError, TypeError):
            return "?"

    def loader(self, batch_size: int, num_workers: int, drop_last: bool = False) -> ShardLoader:
        """litdata's loader: it tells the dataset the epoch and saves and restores its position in it."""
        # drop_last is litdata's own (equal shares per process), not the DataLoader's: left to litdata.
        # Own generator: creating an epoch's iterator must not draw from the global RNG (dropout's), or a run resumed
        # mid-epoch, which creates it after restoring the RNG states, would diverge (litdata shuffles by seed itself)
        return ShardLoader(self, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                           generator=torch.Generator().manual_seed(self.seed))


class ShardLoader(StreamingDataLoader):
    """litdata's ``StreamingDataLoader``, resumed by ``ImageDataModule`` from the state it saved with its own.

    ``load_state_dict`` takes either litdata's mid-epoch state or, between epochs, ``{"current_epoch": n}`` alone;
    it acts once: Lightning gives the loader its own copy as well when it builds the loader after restoring the
    checkpoint, and litdata would count worker turns twice. litdata clears ``restore`` only when the resumed epoch's
    iterator runs out, but Lightning stops asking after the loader's length of batches, so the next epoch would
    resume the same position again; ``restore`` is read only when an iteration starts (and its workers' first
    requests), so it is cleared once that iteration has handed out a batch.
    """

    _resumed = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if self._resumed:
            return
        self._resumed = True
        if "dataset" in obj:
            super().load_state_dict(obj)
        else:
            self.current_epoch = obj["current_epoch"]

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.restore = False
            yield batch
