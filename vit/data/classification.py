"""ImageDataModule: dataset choice, seeded splits, albumentations transforms and loaders."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.ranges import Fraction, NonNegativeInt, PositiveInt, plain, range_problems
from .cache import NodeShare
from .datasets import CIFAR10_CLASSES, DIGITS_CLASSES, ArrayDataset, load_digits_arrays
from .folder import FileDataset, find_classes, list_images
from .folder import scan_image_folder as _scan
from .sampling import EpochSampler, process_share, training_position
from .transforms import AUGMENT_PRESETS, IMAGENET_MEAN, IMAGENET_STD, eval_transform, match_channels, train_transform

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "hf", "streaming")
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3053,) * 3, (0.3760,) * 3),  # measured over all 1,797 images scaled to [0, 1]
}


class ImageDataModule(L.LightningDataModule):
    """Images for classification: ``digits`` (embedded, no download), ``imagefolder``, ``cifar10``/``cifar100``,
    ``hf`` (Hugging Face datasets) or ``streaming`` (litdata shards written by ``vit shards``).

    ``num_classes`` and ``class_names`` are known right after construction, so the CLI can link them
    into the model before anything is loaded.

    Args:
        dataset: "digits" (scikit-learn's 1,797 8x8 digits, no download), "imagefolder", "cifar10", "cifar100",
            "hf" (a Hugging Face dataset) or "streaming" (litdata shards made by `vit shards`).
        root: image folder (root/train/<class>/*.jpg, optional val/ and test/, or root/<class>/*.jpg) or CIFAR folder;
            hf: a hub dataset name (beans, food101) or a local save_to_disk/parquet folder; streaming: the converted
            folder, or its s3:// or gs:// URL.
        img_size: side the images are resized and cropped to (the CLI links it to model.img_size).
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes; 0 = load in the main process.
        val_fraction: share of the training images held out for validation when there is no val/ folder.
        test_fraction: share of the images held out for testing (digits only; CIFAR and folders have their own).
        seed: seed of the splits, the shuffling and the augmentation.
        in_chans: channels the images are converted to, 1 (grayscale) or 3 (the CLI links it to model.in_chans).
        mean: normalisation mean (1 or in_chans values); None = the pretrained weights', else the dataset's.
        std: normalisation standard deviation (1 or in_chans values); None = as for mean.
        augment: training augmentation: "none", "light" (random resized crop, flip, colour jitter) or "strong".
        hflip: flip training images horizontally at random.
        crop_scale: (min, max) share of the image area kept by the training random resized crop.
        crop_padding: > 0: CIFAR's training crop instead of the random resized crop: pad each side by this many
            pixels (reflected) and cut img_size at a random position (crop_scale is then unused).
        color_jitter: brightness/contrast/saturation jitter strength for training (applied with p=0.8); 0 = off.
        random_erasing: probability of erasing a random box of a training image.
        crop_pct: evaluation resizes to img_size / crop_pct, then center-crops img_size.
        download: CIFAR only: download the files when they are not under root (needs internet).
        drop_last: drop the last, incomplete training batch.
        predict_path: images for `predict`: a folder (searched recursively), an image, a .txt list of paths, or a list.
        on_bad_image: unreadable image files: "skip" (warn and list them in skipped_images.tsv) or "error".
        image_key: hf only: the column holding the images; None = the dataset's first Image feature.
        label_key: hf only: the column holding the labels; None = the first ClassLabel feature (its names are the
            class names).
        split_names: hf only: the dataset's split for each of train/val/test, e.g. {val: valid}; missing keys
            default to "train", "validation" or "val", and "test" (no val split: carved from train by val_fraction).
        streaming: hf only: stream the dataset instead of downloading it, sharded per process.
        cache_dir: hf: the datasets cache (default ~/.cache/huggingface/datasets); streaming: litdata's chunk
            cache for an s3:// or gs:// root.
        cache: image folders: decode every image once into memory and augment from there; one copy per node,
            shared by the loader workers and DDP processes; refused with a clear message when it would take over
            half the memory available.

    Example:
        >>> dm = ImageDataModule("digits", img_size=32, batch_size=16)
        >>> dm.num_classes, dm.class_names[:3]
        (10, ['0', '1', '2'])
    """

    def __init__(self, dataset: Literal["digits", "imagefolder", "cifar10", "cifar100", "hf", "streaming"] = "digits",
                 root: str | None = None, img_size: int = 32, batch_size: PositiveInt = 64,
                 num_workers: NonNegativeInt = 0, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2,
                 seed: int = 42, in_chans: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: Literal["none", "light", "strong"] = "light", hflip: bool = True,
                 crop_scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.4,
                 random_erasing: float = 0.0, crop_pct: float = 1.0, crop_padding: NonNegativeInt = 0,
                 download: bool = False, drop_last: bool = False, predict_path: str | list[str] | None = None,
                 on_bad_image: Literal["skip", "error"] = "skip", image_key: str | None = None,
                 label_key: str | None = None, split_names: dict[str, str] | None = None, streaming: bool = False,
                 cache_dir: str | None = None, cache: bool = False):
        super().__init__()
        img_size, batch_size, num_workers, val_fraction, test_fraction, crop_padding = plain(
            img_size, batch_size, num_workers, val_fraction, test_fraction, crop_padding)
        self.save_hyperparameters()  # reads the (now plain) arguments from this frame
        _check_args(dataset=dataset, root=root, img_size=img_size, batch_size=batch_size, num_workers=num_workers,
                    val_fraction=val_fraction, test_fraction=test_fraction, in_chans=in_chans, augment=augment,
                    crop_scale=crop_scale, mean=mean, std=std, image_key=image_key, label_key=label_key,
                    split_names=split_names, streaming=streaming, crop_padding=crop_padding)
        self.image_key, self.label_key, self.split_names = image_key, label_key, split_names
        self.streaming, self.cache_dir = streaming, cache_dir
        self._source = None  # hf / streaming: the opened source (class names, splits), see _open_source
        self.dataset = dataset
        self.root = Path(root).expanduser() if root else None
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.in_chans = in_chans
        self.download = download
        self.drop_last = drop_last
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"invalid data configuration:\n  data.on_bad_image: expected 'skip' or 'error', "
                             f"got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.skipped_images: list[tuple[str, str]] = []  # (path, reason) left out by the folder scan
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a resumed checkpoint
        self._train_stream = None  # litdata's training loader, whose position is saved with ours
        self._stream_state: dict | None = None  # that position from a resumed checkpoint, until the loader exists
        self.augment, self.hflip, self.crop_scale = augment, hflip, tuple(crop_scale)
        self.color_jitter, self.random_erasing, self.crop_pct = color_jitter, random_erasing, crop_pct
        self.crop_padding = crop_padding
        default_mean, default_std = _STATS.get(dataset, (IMAGENET_MEAN, IMAGENET_STD))
        self.mean = match_channels(mean if mean is not None else default_mean, in_chans)
        self.std = match_channels(std if std is not None else default_std, in_chans)
        # recorded resolved, so a checkpoint tells vit.load_pretrained / vit predict how to normalise
        self.hparams.update(mean=list(self.mean), std=list(self.std))
        self.class_names = self._find_class_names()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # `predict`: a folder (searched recursively), one image, a .txt list of paths, or a list of paths
        self.predict_path = predict_path
        self.predict_files: list[str] = []
        self.predict_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- transforms ------------------------------------------------------------------------------
    def train_transform(self):
        return train_transform(self.img_size, self.mean, self.std, augment=self.augment, hflip=self.hflip,
                               crop_scale=self.crop_scale, color_jitter=self.color_jitter,
                               random_erasing=self.random_erasing, crop_padding=self.crop_padding)

    def eval_transform(self):
        return eval_transform(self.img_size, self.mean, self.std, crop_pct=self.crop_pct)

    # ---- datasets --------------------------------------------------------------------------------
    def _find_class_names(self) -> list[str]:
        if self.dataset == "digits":
            return list(DIGITS_CLASSES)
        if self.dataset == "cifar10":
            return list(CIFAR10_CLASSES)
        if self.dataset == "cifar100":
            return _cifar100_names(self.root)
        if self.dataset in ("hf", "streaming"):
            self._source = self._open_source()
            return list(self._source.class_names)
        train_dir = self.root / "train" if (self.root / "train").is_dir() else self.root
        names = find_classes(train_dir)
        if not names:
            raise ValueError(f"data.root: {train_dir} has no class folders; expected "
                             f"root/train/<class>/*.jpg (and root/val/...) or root/<class>/*.jpg")
        return names

    def _split(self, n: int, fractions: Sequence[float]) -> list[np.ndarray]:
        """Seeded random split of range(n): one index array per fraction, the remainder first."""
        order = np.random.default_rng(self.seed).permutation(n)
        sizes = [int(round(n * f)) for f in fractions]
        parts, start = [], sum(sizes)
        parts.append(np.sort(order[start:]))
        for size in sizes:
            start -= size
            parts.append(np.sort(order[start:start + size]))
        return parts

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.train_set is not None:
            return
        train_tf, eval_tf = self.train_transform(), self.eval_transform()
        if self.dataset == "digits":
            images, labels = load_digits_arrays(self.in_chans)
            train, val, test = self._split(len(images), [self.val_fraction, self.test_fraction])
            self.train_set = ArrayDataset(images, labels, train_tf, train)
            self.val_set = ArrayDataset(images, labels, eval_tf, val)
            self.test_set = ArrayDataset(images, labels, eval_tf, test)
        elif self.dataset in ("cifar10", "cifar100"):
            train_arrays, test_arrays = _load_cifar(self.dataset, self.root, self.download)
            images, labels = train_arrays
            images = _to_channels(images, self.in_chans)
            train, val = self._split(len(images), [self.val_fraction])
            self.train_set = ArrayDataset(images, labels, train_tf, train)
            self.val_set = ArrayDataset(images, labels, eval_tf, val)
            self.test_set = ArrayDataset(_to_channels(test_arrays[0], self.in_chans), test_arrays[1], eval_tf)
        elif self.dataset in ("hf", "streaming"):
            self._setup_source(train_tf, eval_tf)
        else:
            self._setup_imagefolder(train_tf, eval_tf)

    def _setup_imagefolder(self, train_tf, eval_tf) -> None:
        root = self.root
        skipped: list[tuple[str, str]] = []

        def scan_image_folder(folder, class_names):  # every split: same header checks, same skip list
            return _scan(folder, class_names, self.on_bad_image, skipped)

        if (root / "train").is_dir():
            train_samples = scan_image_folder(root / "train", self.class_names)
            if (root / "val").is_dir():
                val_samples = scan_image_folder(root / "val", self.class_names)
            else:
                train_idx, val_idx = self._split(len(train_samples), [self.val_fraction])
                val_samples = [train_samples[i] for i in val_idx]
                train_samples = [train_samples[i] for i in train_idx]
            test_samples = scan_image_folder(root / "test", self.class_names) if (root / "test").is_dir() \
                else val_samples  # val doubles as the test split when there is no test/
        else:
            samples = scan_image_folder(root, self.class_names)
            train_idx, val_idx = self._split(len(samples), [self.val_fraction])
            train_samples = [samples[i] for i in train_idx]
            val_samples = test_samples = [samples[i] for i in val_idx]
        if not train_samples:
            raise ValueError(f"data.root: no training images found under {root}")
        skip_log = self._report_skipped(skipped, train_samples)
        self.train_set = FileDataset(train_samples, train_tf, self.in_chans, self.on_bad_image, skip_log)
        self.val_set = FileDataset(val_samples, eval_tf, self.in_chans, self.on_bad_image, skip_log)
        self.test_set = FileDataset(test_samples, eval_tf, self.in_chans, self.on_bad_image, skip_log)
        if self.hparams.get("cache"):
            share = NodeShare.for_trainer(getattr(self, "trainer", None))  # DDP: one decoded copy per node
            cached: list[FileDataset] = []
            for dataset in (self.train_set, self.val_set, self.test_set):
                same = next((c for c in cached if c.samples == dataset.samples), None)  # val doubling as test
                if same is not None:
                    dataset.decoded = same.decoded
                else:
                    cached.append(dataset.cache_decoded(threads=max(1, self.num_workers), share=share))

    def _open_source(self):
        """``hf``: a Hugging Face dataset (see hf.py); ``streaming``: converted litdata shards (see streaming.py).
        Imported here: neither library is loaded for the other sources."""
        if self.dataset == "hf":
            from .hf import HFSource
            return HFSource(self.hparams.root, image_key=self.image_key, label_key=self.label_key,
                            split_names=self.split_names, streaming=self.streaming, cache_dir=self.cache_dir)
        from .streaming import ShardSource
        return ShardSource(self.hparams.root, cache_dir=self.cache_dir)

    def _setup_source(self, train_tf, eval_tf) -> None:
        """``hf`` and ``streaming``: the source builds the three splits (a missing val split carved from train by
        seed); images that fail to decode are reported as for image folders."""
        sets = self._source.datasets(train_tf, eval_tf, carve=lambda n: self._split(n, [self.val_fraction]),
                                     val_fraction=self.val_fraction, seed=self.seed, in_chans=self.in_chans,
                                     on_bad_image=self.on_bad_image, **self._process_share())
        labels = getattr(sets[0], "labels", None)
        if labels is None:  # a stream's labels are not known in advance: no check for empty classes
            labels = range(self.num_classes)
        skip_log = self._report_skipped([], ((None, int(label)) for label in labels))
        for data in {id(data): data for data in sets}.values():
            data.skips.path = skip_log
        self.train_set, self.val_set, self.test_set = sets

    def _report_skipped(self, skipped: list[tuple[str, str]], train_samples) -> Path | None:
        """One warning for everything the scan left out, each path and reason in ``skipped_images.tsv`` in the
        run directory (the file later decode failures are appended to); empty training classes warned too."""
        self.skipped_images = skipped
        trainer = getattr(self, "trainer", None)
        log = None
        if trainer is not None and trainer.log_dir:
            log = Path(trainer.log_dir) / "skipped_images.tsv"
            if trainer.is_global_zero and skipped:  # decode failures later append (and create it if need be)
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8")
        if skipped:
            where = f"; every path and reason in {log}" if log else ""
            warnings.warn(f"data: skipped {len(skipped)} unusable image file(s) under {self.root} (first: "
                          f"{skipped[0][0]}: {skipped[0][1]}){where}", stacklevel=2)
        counts = np.bincount([label for _, label in train_samples], minlength=self.num_classes)
        empty = [name for name, n in zip(self.class_names, counts) if n == 0]
        if empty:
            warnings.warn(f"data: class folder(s) {empty} have no usable training images; the model still "
                          f"predicts them but cannot learn them", stacklevel=2)
        return log

    def _setup_predict(self) -> None:
        if self.predict_path is None:
            raise ValueError("data.predict_path: required for `predict` (an image folder, an image, a .txt list "
                             "of image paths, or a list of paths)")
        self.predict_files = list_images(self.predict_path)
        # the "label" of a prediction sample is its index into predict_files (for the CSV writer)
        self.predict_set = FileDataset([(f, i) for i, f in enumerate(self.predict_files)], self.eval_transform(),
                                       self.in_chans)

    # ---- loaders ---------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if hasattr(dataset, "loader"):  # streamed sources (hf.py, streaming.py) order and shard themselves
            loader = dataset.loader(self.batch_size, self.num_workers, drop_last=drop_last)
            if shuffle and hasattr(loader, "load_state_dict"):  # litdata's: it can resume mid-epoch
                self._train_stream = loader
                self._restore_stream()
            return loader
        # Shuffle order and augmentation are functions of (seed, epoch, position): reproducible with any number
        # of workers, and a resumed run continues exactly where the checkpoint left off (see sampling.py).
        # The training sampler splits the data between processes itself, so a resume skips what each process
        # has trained on, after the split (Lightning leaves a DistributedSampler as it is).
        sampler = EpochSampler(len(dataset), self.seed, **self._process_share()) if shuffle else None
        if sampler is not None and self._resume_at is not None:
            sampler.start_at(self._resume_at[0], self._resume_at[1] * self.batch_size)
            self._resume_at = None
        per_process = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=drop_last and per_process > self.batch_size,
                          # own generator: creating an iterator must not draw from the global RNG (dropout's),
                          # or a resumed run, which creates it before restoring RNG states, would diverge
                          generator=torch.Generator().manual_seed(self.seed))

    def _process_share(self) -> dict:
        return process_share(self)

    # ---- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Saved in every checkpoint: where training stands in the data (epoch, batches done in it)."""
        state = training_position(self)
        if not state:
            return {}
        done = state["batches_done"]
        loader = self._train_stream
        if loader is not None:
            # litdata counts the samples its loader has handed out; Lightning does not fetch ahead of a loader with
            # a length, so they are exactly the trained ones (worker read-ahead is not counted). Between epochs only
            # its epoch counter: an epoch cut short by limit_train_batches must not be resumed as one under way.
            state["stream"] = loader.state_dict() if done else {"current_epoch": loader.current_epoch}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches_done"]))
            self._stream_state = state.get("stream")
            self._restore_stream()

    def _restore_stream(self) -> None:
        """Hands a resumed checkpoint's litdata position to the training loader, whichever of the two comes first.
        Lightning builds the loader before restoring its own loop state when ``configure_optimizers`` reads
        ``estimated_stepping_batches``, and then never gives the loader the state Lightning saved for it."""
        if self._train_stream is None or self._stream_state is None:
            return
        # mid-epoch, litdata re-plans the rest of the epoch for another num_workers itself (see streaming.py)
        self._train_stream.load_state_dict(self._stream_state)
        self._stream_state = None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)


def _check_args(*, dataset, root, img_size, batch_size, num_workers, val_fraction, test_fraction, in_chans, augment,
                crop_scale, mean, std, image_key=None, label_key=None, split_names=None, streaming=False,
                crop_padding=0) -> None:
    problems = []
    if dataset not in DATASETS:
        problems.append(f"data.dataset: expected one of {DATASETS}, got {dataset!r}")
    problems += _source_problems(dataset, root, image_key=image_key, label_key=label_key, split_names=split_names,
                                 streaming=streaming)
    if dataset == "imagefolder":
        if not root:
            problems.append("data.root: required for dataset 'imagefolder' (a folder of class sub-folders)")
        elif not Path(root).expanduser().is_dir():
            problems.append(f"data.root: {root} is not a directory")
    problems += range_problems("data", {
        "img_size": (PositiveInt, img_size), "batch_size": (PositiveInt, batch_size),
        "num_workers": (NonNegativeInt, num_workers), "val_fraction": (Fraction, val_fraction),
        "test_fraction": (Fraction, test_fraction), "crop_padding": (NonNegativeInt, crop_padding)})
    if val_fraction + test_fraction >= 1.0:
        problems.append(f"data.val_fraction + data.test_fraction must leave training data, got "
                        f"{val_fraction} + {test_fraction}")
    if in_chans not in (1, 3):
        problems.append(f"data.in_chans: expected 1 or 3, got {in_chans!r}")
    if augment not in AUGMENT_PRESETS:
        problems.append(f"data.augment: expected one of {AUGMENT_PRESETS}, got {augment!r}")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        problems.append(f"data.crop_scale: expected (min, max) with 0 < min <= max <= 1, got {crop_scale}")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) not in (1, in_chans):
            problems.append(f"data.{key}: expected 1 or {in_chans} values, got {list(value)}")
    if std is not None and any(s <= 0 for s in std):
        problems.append(f"data.std: expected positive values, got {list(std)}")
    if problems:
        raise ValueError("invalid data configuration:\n  " + "\n  ".join(problems))


def _source_problems(dataset, root, **hf_only) -> list[str]:
    """``hf`` and ``streaming``: what ``root`` must be, and the keys only ``hf`` reads."""
    problems = [f"data.{key}: only read by dataset 'hf', got {value!r} with dataset {dataset!r}"
                for key, value in hf_only.items() if value not in (None, False) and dataset != "hf"]
    if dataset == "hf":
        if not root:
            problems.append("data.root: required for dataset 'hf' (a hub dataset name such as 'beans', or a local "
                            "save_to_disk or parquet folder)")
        elif str(root).startswith(("/", ".", "~")) and not Path(root).expanduser().is_dir():
            problems.append(f"data.root: {root} is not a directory")
        split_names = hf_only["split_names"]
        if split_names is not None:
            unknown = sorted(set(split_names) - {"train", "val", "test"})
            if unknown:
                problems.append(f"data.split_names: unknown key(s) {unknown}; expected some of train, val, test")
    if dataset == "streaming":
        if not root:
            problems.append("data.root: required for dataset 'streaming' (a folder written by "
                            "vit shards, or its s3:// or gs:// URL)")
        elif "://" in str(root):
            if not str(root).startswith(("s3://", "gs://")):
                problems.append(f"data.root: expected a local folder or an s3:// or gs:// URL, got {root}")
        elif not Path(root).expanduser().is_dir():
            problems.append(f"data.root: {root} is not a directory")
    return problems


def _to_channels(images: np.ndarray, in_chans: int) -> np.ndarray:
    if in_chans == 1 and images.shape[-1] == 3:
        gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return gray.round().astype(np.uint8)[..., None]
    return images


def _cifar_root(root: Path | None) -> Path:
    return root if root is not None else Path(os.environ.get("VIT_DATA", "data"))


def _load_cifar(name: str, root: Path | None, download: bool):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = _cifar_root(root)
    try:
        train, test = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        folder = cls.base_folder
        raise FileNotFoundError(
            f"{name}: no usable copy under {root}/{folder} ({err}). Set `data.download: true` to fetch it "
            f"(needs internet), or place the extracted '{folder}' folder under data.root={root}.") from None
    return (train.data, train.targets), (test.data, test.targets)


def _cifar100_names(root: Path | None) -> list[str]:
    import pickle
    meta = _cifar_root(root) / "cifar-100-python" / "meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            # torchvision's own reader does the same: the meta file is a plain dict of strings.
            return list(pickle.load(f, encoding="latin1")["fine_label_names"])
    return [f"class_{i}" for i in range(100)]
