"""SegmentationDataModule: images with per-pixel labels: the synthetic ``shapes`` scenes, mask folders, Pascal VOC
or ADE20K.

Batches are ``(images, masks)``: images float (B, 3, H, W) in [0, 1], not normalised (the segmentation model
normalises with its weights' mean/std), masks int64 (B, H, W) with classes 0..K-1 and ``ignore_index`` (255) for
pixels that count nowhere. Training crops are ``img_size`` square; evaluation images keep their size (or the
``resize`` one) and a batch of different sizes is padded bottom/right, masks with the ignore index.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from ..utils.ranges import Fraction, NonNegativeFloat, NonNegativeInt, PositiveInt, plain, range_problems
from .images import SkipLog, first_decodable
from .masks import (DEFAULT_SPLIT_NAMES, READERS, BadSampleError, SegmentationSample,  # noqa: F401  (re-exported)
                    load_sample, split_exists)
from .sampling import ResumableLoaders, seed_transform, split_index
from .shapes import SHAPES_SEGMENTATION_CLASSES, make_shape_masks

SPLITS = ("train", "val", "test")
SKIP_LOG = "skipped_samples.tsv"  # in the run directory: every sample left out, with its file and problem


# ---- transforms --------------------------------------------------------------------------------------------
def _resize(size: int | None) -> list:
    # bilinear for the image, nearest for the mask: a label is never blended into another
    return [] if size is None else [A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR,
                                                      mask_interpolation=cv2.INTER_NEAREST)]


def segmentation_train_transform(img_size: int, resize: int | None = None,
                                 scale_range: Sequence[float] = (0.5, 2.0), hflip: bool = True,
                                 color_jitter: float = 0.3, ignore_index: int = 255) -> A.Compose:
    """mmsegmentation's training pipeline: the shorter side resized to ``resize`` (None: kept), scaled at random by
    a factor in ``scale_range``, padded to ``img_size`` (image 0, mask ``ignore_index``), cropped at random to
    ``img_size`` square, flipped, colour-jittered; masks follow every geometric step with nearest-neighbour.

    Example:
        >>> out = segmentation_train_transform(32)(image=np.zeros((20, 40, 3), np.uint8), mask=np.ones((20, 40), np.uint8))
        >>> tuple(out["image"].shape), tuple(out["mask"].shape), set(np.unique(out["mask"]).tolist()) <= {1, 255}
        ((3, 32, 32), (32, 32), True)
    """
    lo, hi = scale_range
    ops = [*_resize(resize),
           A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                         mask_interpolation=cv2.INTER_NEAREST, p=1.0),
           A.PadIfNeeded(img_size, img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                         fill_mask=ignore_index),
           A.RandomCrop(img_size, img_size)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0,
                                 p=0.8))
    return A.Compose([*ops, A.ToFloat(max_value=255.0), ToTensorV2()])


def segmentation_eval_transform(resize: int | None = None) -> A.Compose:
    """The shorter side resized to ``resize`` (mask nearest-neighbour), or the image as it is; to tensors.

    Example:
        >>> out = segmentation_eval_transform(16)(image=np.zeros((20, 40, 3), np.uint8), mask=np.ones((20, 40), np.uint8))
        >>> tuple(out["image"].shape), tuple(out["mask"].shape)
        ((3, 16, 32), (16, 32))
    """
    return A.Compose([*_resize(resize), A.ToFloat(max_value=255.0), ToTensorV2()])


# ---- datasets ----------------------------------------------------------------------------------------------
class SampleSkips(SkipLog):
    """The skip log of a segmentation dataset: ``skipped_samples.tsv`` (file, problem) plus a count in memory."""

    def __init__(self, path: str | Path | None = None):
        super().__init__(path)
        self.entries: list[tuple[str, str]] = []

    def record(self, err) -> None:
        self.entries.append((err.path, err.reason))
        super().record(err)


class SegmentationDataset(Dataset):
    """Samples read and checked on access (``load_sample``), transformed with their masks: ``(image, mask)``.

    A sample that fails a check raises ``BadSampleError`` with ``on_bad_sample="error"``; with ``"skip"`` the next
    sample takes its place and the failure goes to ``skips`` (and ``skipped_samples.tsv`` when it has a path).
    """

    def __init__(self, samples: Sequence[SegmentationSample], transform, num_classes: int, ignore_index: int = 255,
                 reduce_zero_label: bool = False, on_bad_sample: str = "skip", skip_log: str | Path | None = None):
        self.samples, self.transform = list(samples), transform
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.on_bad_sample = on_bad_sample
        self.skips = SampleSkips(skip_log)
        self._images: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, j: int):
        image, mask = load_sample(self.samples[j], self.num_classes, self.ignore_index, self.reduce_zero_label)
        self._images[j] = mask  # first_decodable hands back the image; the mask waits here for it
        return image

    def __getitem__(self, item):
        i, sample_seed = split_index(item)
        j, image = first_decodable(i, len(self.samples), self._load, self.on_bad_sample, self.skips,
                                   lambda k: self.samples[k].name)
        mask = self._images.pop(j)
        if sample_seed is not None:
            seed_transform(self.transform, sample_seed)
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class PadCollate:
    """Stack a batch, padding different sizes bottom/right: images with 0, masks with the ignore index."""

    def __init__(self, ignore_index: int = 255):
        self.ignore_index = ignore_index

    def __call__(self, batch):
        images, masks = zip(*batch)
        height, width = max(m.shape[-2] for m in masks), max(m.shape[-1] for m in masks)
        out_images = images[0].new_zeros(len(images), images[0].shape[0], height, width)
        out_masks = torch.full((len(masks), height, width), self.ignore_index, dtype=torch.long)
        for k, (image, mask) in enumerate(zip(images, masks)):
            out_images[k, :, :image.shape[-2], :image.shape[-1]] = image
            out_masks[k, :mask.shape[-2], :mask.shape[-1]] = mask
        return out_images, out_masks


# ---- the data module ---------------------------------------------------------------------------------------
class SegmentationDataModule(ResumableLoaders, L.LightningDataModule):
    """Images with per-pixel labels for semantic segmentation.

    Layouts (``data.root``): ``folder``: ``images/<split>/*`` with ``masks/<split>/<stem>.png`` (single-channel index
    PNGs) and ``classes.txt`` (line i names class i); ``voc``: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs,
    read as indices), ``ImageSets/Segmentation/<split>.txt``; ``ade20k``: ``images/<split>/``,
    ``annotations/<split>/``, class names from ``classes.txt`` or ``objectInfo150.txt``. ``shapes`` is generated
    in memory from the seed (background, square, circle, triangle). Without a val split, ``val_fraction`` of
    train is held out (seeded); without a test split, val doubles as test.

    Args:
        dataset: "shapes", "folder", "voc" or "ade20k".
        root: the folder (not for shapes).
        img_size: side of the square training crops.
        resize: shorter side every image is resized to before the training augmentation and for evaluation;
            None = the files' own size.
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes; 0 = load in the main process.
        seed: seed of the shapes scenes, the held-out split, the shuffling and the augmentation.
        num_images: shapes only: scenes generated.
        val_fraction: share of train held out for validation (shapes, or a layout without a val split).
        test_fraction: shapes only: share of the scenes held out for testing.
        max_objects: shapes only: most shapes in one scene.
        split_names: the folder / list name of each of train/val/test (defaults: the layout's own, e.g. ADE20K's
            training/validation).
        scale_range: training random scale: (min, max) factor on the (resized) image.
        hflip: flip training images horizontally at random.
        color_jitter: strength of the training brightness/contrast/saturation jitter; 0 = off.
        ignore_index: mask value that counts in neither loss nor metrics (padding gets it too).
        reduce_zero_label: label 0 becomes the ignore index, the others shift down by one (ADE20K's "other"
            class); None = on for ade20k only.
        on_bad_sample: a missing or unreadable mask or image, a mask of another size than its image, a label that
            is neither a class nor the ignore index: "skip" (one warning, counted in ``skipped_samples``, listed in
            ``skipped_samples.tsv`` in the run directory) or "error" (raise naming the file and the values found).

    Example:
        >>> dm = SegmentationDataModule("shapes", img_size=32, num_images=8, batch_size=4)
        >>> dm.setup("fit"); images, masks = next(iter(dm.train_dataloader()))
        >>> dm.class_names, tuple(images.shape), tuple(masks.shape), masks.dtype
        (['background', 'square', 'circle', 'triangle'], (4, 3, 32, 32), (4, 32, 32), torch.int64)
    """

    def __init__(self, dataset: Literal["shapes", "folder", "voc", "ade20k"] = "shapes", root: str | None = None,
                 img_size: PositiveInt = 64, resize: PositiveInt | None = None, batch_size: PositiveInt = 8,
                 num_workers: NonNegativeInt = 0, seed: int = 42, num_images: PositiveInt = 256,
                 val_fraction: Fraction = 0.125, test_fraction: Fraction = 0.125, max_objects: NonNegativeInt = 4,
                 split_names: dict[str, str] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: bool = True, color_jitter: NonNegativeFloat = 0.3, ignore_index: int = 255,
                 reduce_zero_label: bool | None = None, on_bad_sample: Literal["skip", "error"] = "skip"):
        super().__init__()
        (img_size, resize, batch_size, num_workers, num_images, val_fraction, test_fraction, max_objects,
         color_jitter) = plain(img_size, resize, batch_size, num_workers, num_images, val_fraction, test_fraction,
                               max_objects, color_jitter)
        scale_range = tuple(float(s) for s in scale_range)
        self.save_hyperparameters()
        _check_args(dataset=dataset, root=root, img_size=img_size, resize=resize, batch_size=batch_size,
                    num_workers=num_workers, num_images=num_images, val_fraction=val_fraction,
                    test_fraction=test_fraction, max_objects=max_objects, split_names=split_names,
                    scale_range=scale_range, color_jitter=color_jitter, ignore_index=ignore_index,
                    on_bad_sample=on_bad_sample)
        self.dataset, self.img_size, self.batch_size, self.num_workers, self.seed = \
            dataset, img_size, batch_size, num_workers, seed
        self.root = Path(root).expanduser() if root else None
        self.ignore_index, self.on_bad_sample = ignore_index, on_bad_sample
        self.reduce_zero_label = dataset == "ade20k" if reduce_zero_label is None else bool(reduce_zero_label)
        defaults = DEFAULT_SPLIT_NAMES.get(dataset, DEFAULT_SPLIT_NAMES["folder"])
        self.split_names = {split: (split_names or {}).get(split, defaults[split]) for split in SPLITS}
        self.class_names = (list(SHAPES_SEGMENTATION_CLASSES) if dataset == "shapes"
                            else READERS[dataset][0](self.root))
        if not self.class_names:
            raise ValueError(f"data.root: no class names found for the {dataset} folder {self.root}")
        self.train_set: SegmentationDataset | None = None
        self.val_set: SegmentationDataset | None = None
        self.test_set: SegmentationDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped_samples(self) -> list[tuple[str, str]]:
        """(file, problem) of every sample skipped so far in this process (workers' skips are in the TSV only)."""
        sets = [s for s in (self.train_set, self.val_set, self.test_set) if s is not None]
        return [entry for s in dict.fromkeys(sets) for entry in s.skips.entries]

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        return segmentation_train_transform(self.img_size, hp.resize, hp.scale_range, hp.hflip, hp.color_jitter,
                                            self.ignore_index)

    def eval_transform(self) -> A.Compose:
        return segmentation_eval_transform(self.hparams.resize)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self._shape_splits() if self.dataset == "shapes" else self._folder_splits()
        trainer = getattr(self, "trainer", None)
        log = Path(trainer.log_dir) / SKIP_LOG if trainer is not None and trainer.log_dir else None
        common = dict(num_classes=self.num_classes, ignore_index=self.ignore_index,
                      reduce_zero_label=self.reduce_zero_label, on_bad_sample=self.on_bad_sample, skip_log=log)
        self.train_set = SegmentationDataset(splits["train"], self.train_transform(), **common)
        self.val_set = SegmentationDataset(splits["val"], self.eval_transform(), **common)
        self.test_set = (self.val_set if splits["test"] is splits["val"]
                         else SegmentationDataset(splits["test"], self.eval_transform(), **common))

    def _shape_splits(self) -> dict[str, list[SegmentationSample]]:
        pairs = make_shape_masks(self.hparams.num_images, self.img_size, self.seed, self.hparams.max_objects)
        samples = [SegmentationSample(image, mask, f"shapes[{i}]") for i, (image, mask) in enumerate(pairs)]
        n_val = int(round(len(samples) * self.hparams.val_fraction))
        n_test = int(round(len(samples) * self.hparams.test_fraction))
        return _carve(samples, self.seed, n_val, n_test)

    def _folder_splits(self) -> dict[str, list[SegmentationSample]]:
        read = READERS[self.dataset][1]
        names = self.split_names
        train = read(self.root, names["train"])
        if split_exists(self.dataset, self.root, names["val"]):
            splits = {"train": train, "val": read(self.root, names["val"])}
        else:  # no val split: hold out a seeded share of train
            splits = _carve(train, self.seed, max(1, int(round(len(train) * self.hparams.val_fraction))), 0)
        splits["test"] = (read(self.root, names["test"]) if split_exists(self.dataset, self.root, names["test"])
                          else splits["val"])
        if not splits["train"]:
            raise ValueError(f"data.root: no training images in the {self.dataset} folder {self.root}")
        return splits

    # ---- loaders ---------------------------------------------------------------------------------
    def collate(self):
        return PadCollate(self.ignore_index)


def _carve(samples: list, seed: int, n_val: int, n_test: int) -> dict[str, list]:
    """A seeded split of ``samples`` into train / val (``n_val``) / test (``n_test``; 0: val doubles as test)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    val, test, train = np.split(order, [n_val, n_val + n_test])
    splits = {name: [samples[i] for i in sorted(part)] for name, part in (("train", train), ("val", val))}
    splits["test"] = [samples[i] for i in sorted(test)] if n_test else splits["val"]
    return splits


def _check_args(*, dataset, root, img_size, resize, batch_size, num_workers, num_images, val_fraction,
                test_fraction, max_objects, split_names, scale_range, color_jitter, ignore_index,
                on_bad_sample) -> None:
    problems = []
    layouts = {"folder": "a folder with images/<split>/, masks/<split>/<stem>.png and classes.txt",
               "voc": "a folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt",
               "ade20k": "a folder with images/<split>/ and annotations/<split>/ (ADEChallengeData2016)"}
    if dataset not in ("shapes", *layouts):
        problems.append(f"data.dataset: expected 'shapes', 'folder', 'voc' or 'ade20k', got {dataset!r}")
    elif dataset in layouts:
        if not root:
            problems.append(f"data.root: required for dataset {dataset!r} ({layouts[dataset]})")
        else:
            base = Path(root).expanduser()
            name = (split_names or {}).get("train", DEFAULT_SPLIT_NAMES[dataset]["train"])
            if not split_exists(dataset, base, name):
                problems.append(f"data.root: the train split {name!r} of {base} not found ({layouts[dataset]})")
    elif root is not None:
        problems.append(f"data.root: not read by dataset 'shapes', got {root!r}")
    if split_names is not None and set(split_names) - set(SPLITS):
        problems.append(f"data.split_names: unknown key(s) {sorted(set(split_names) - set(SPLITS))}; "
                        f"expected some of train, val, test")
    problems += range_problems("data", {
        "img_size": (PositiveInt, img_size), "batch_size": (PositiveInt, batch_size),
        "num_workers": (NonNegativeInt, num_workers), "num_images": (PositiveInt, num_images),
        "val_fraction": (Fraction, val_fraction), "test_fraction": (Fraction, test_fraction),
        "max_objects": (NonNegativeInt, max_objects), "color_jitter": (NonNegativeFloat, color_jitter)})
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        problems.append(f"data.resize: expected a positive integer or null, got {resize!r}")
    if val_fraction + test_fraction >= 1.0:
        problems.append(f"data.val_fraction + data.test_fraction must leave training data, got "
                        f"{val_fraction} + {test_fraction}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        problems.append(f"data.scale_range: expected (min, max) with 0 < min <= max, got {list(scale_range)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        problems.append(f"data.ignore_index: expected an integer, got {ignore_index!r}")
    if on_bad_sample not in ("skip", "error"):
        problems.append(f"data.on_bad_sample: expected 'skip' or 'error', got {on_bad_sample!r}")
    if problems:
        raise ValueError("invalid data configuration:\n  " + "\n  ".join(problems))
