"""ImageTextDataModule: image-caption pairs for contrastive training.

Three sources: a folder with ``captions.csv`` (columns ``file``, ``caption``; several rows may share an image), class
folders, or scikit-learn's digits, whose class names are turned into captions by templates ("a photo of the digit
{}."). Batches are ``(images (B, C, H, W), captions: list[str])``; the task module tokenises the captions with its
model's own tokenizer. Class data reuse ``ImageDataModule`` for the split, the decoding and the augmentation.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.ranges import Fraction, NonNegativeInt, PositiveInt, plain, range_problems
from .classification import ImageDataModule
from .folder import FileDataset
from .images import check_image
from .sampling import EpochSampler, process_share, split_index
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, match_channels, train_transform

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# captions for class data when data.templates is not given
DEFAULT_TEMPLATES = ("a photo of a {}.",)
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a picture of a {}.",
                   "an image of the digit {}.")


class CaptionedDataset(Dataset):
    """(image, caption) from a dataset of (image, label): ``caption(label, sample_seed)`` names the caption (for a
    captions file the label is the row; for class data the class, with a template drawn from the seed)."""

    def __init__(self, images: Dataset, caption: Callable[[int, int | None], str]):
        self.images, self.caption = images, caption

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        _, sample_seed = split_index(item)
        image, label = self.images[item]
        return image, self.caption(int(label), sample_seed)


class ImageTextDataModule(L.LightningDataModule):
    """Image-caption pairs: ``captions`` (a folder with ``captions.csv``), ``imagefolder`` (class folders) or
    ``digits`` (embedded, no download); class names become captions through ``templates``.

    Training draws one template per image and epoch (seeded); validation and test caption every image with the
    first template, so ``val/acc`` (image -> caption among the distinct captions) is a zero-shot accuracy there.

    Args:
        dataset: "captions", "imagefolder" or "digits".
        root: captions: the folder holding ``captions_file`` (image paths in it are relative to this folder);
            imagefolder: root/<class>/... or root/train/<class>/... (val/, test/ optional), as for ImageDataModule.
        captions_file: name of the captions table in ``root``: a CSV with a header holding ``file`` and ``caption``.
        templates: class data: strings with one ``{}`` for the class name; None = the digits' five templates
            ("a photo of the digit {}.", ...) or "a photo of a {}.".
        class_names: class data: the words put in the templates, one per class (default: the folder names; digits:
            "zero" ... "nine").
        img_size: side the images are resized and cropped to (the CLI links it to model.backbone.img_size).
        batch_size: pairs per batch and process (the contrastive loss sees the batch of every process).
        num_workers: DataLoader worker processes.
        val_fraction: share of the images held out for validation (captions: of the distinct image files).
        test_fraction: digits only: share held out for testing.
        seed: seed of the splits, the shuffling, the templates drawn and the augmentation.
        in_chans: channels the images are converted to (the CLI links it to model.backbone.in_chans).
        mean: normalisation mean; None = a pretrained model's (the CLI sets it), else the dataset's / ImageNet's.
        std: normalisation standard deviation; None = as for mean.
        augment: training augmentation: "none" or "light" (random resized crop, no flip: captions may say left/right).
        crop_scale: (min, max) share of the image area kept by the training crop.
        drop_last: drop the last, incomplete training batch (DDP needs equal batches on every process).
        on_bad_row: captions rows naming a missing or unreadable file, or with an empty caption: "skip" (warned,
            listed in ``skipped_rows``) or "error" (names the file and row).

    Example:
        >>> dm = ImageTextDataModule("digits", img_size=16, batch_size=8)
        >>> dm.setup("fit"); images, captions = next(iter(dm.val_dataloader()))
        >>> images.shape, captions[0]
        (torch.Size([8, 3, 16, 16]), 'a photo of the digit two.')
    """

    def __init__(self, dataset: Literal["captions", "imagefolder", "digits"] = "captions", root: str | None = None,
                 captions_file: str = "captions.csv", templates: list[str] | None = None,
                 class_names: list[str] | None = None, img_size: int = 224, batch_size: PositiveInt = 64,
                 num_workers: NonNegativeInt = 0, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2,
                 seed: int = 42, in_chans: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: Literal["none", "light"] = "light",
                 crop_scale: tuple[float, float] = (0.5, 1.0), drop_last: bool = True,
                 on_bad_row: Literal["skip", "error"] = "skip"):
        super().__init__()
        img_size, batch_size, num_workers, val_fraction, test_fraction = plain(
            img_size, batch_size, num_workers, val_fraction, test_fraction)
        problems = range_problems("data", {"img_size": (PositiveInt, img_size), "batch_size": (PositiveInt, batch_size),
                                           "num_workers": (NonNegativeInt, num_workers),
                                           "val_fraction": (Fraction, val_fraction),
                                           "test_fraction": (Fraction, test_fraction)})
        choices = {"dataset": (dataset, ("captions", "imagefolder", "digits")), "augment": (augment, ("none", "light")),
                   "on_bad_row": (on_bad_row, ("skip", "error"))}
        problems += [f"data.{k}: expected one of {', '.join(c)}, got {v!r}" for k, (v, c) in choices.items()
                     if v not in c]
        if dataset != "digits" and not root:
            problems.append(f"data.root: required for dataset {dataset!r} (a folder)")
        for template in templates or ():
            if not isinstance(template, str) or template.count("{}") != 1:
                problems.append(f"data.templates: each template needs exactly one '{{}}', got {template!r}")
        if problems:
            raise ValueError("invalid data configuration:\n  " + "\n  ".join(problems))
        self.dataset, self.root = dataset, Path(root).expanduser() if root else None
        self.captions_file, self.img_size, self.batch_size = captions_file, img_size, batch_size
        self.num_workers, self.val_fraction, self.test_fraction = num_workers, val_fraction, test_fraction
        self.seed, self.in_chans, self.augment, self.crop_scale = seed, in_chans, augment, tuple(crop_scale)
        self.drop_last, self.on_bad_row = drop_last, on_bad_row
        self.templates = list(templates or (DIGIT_TEMPLATES if dataset == "digits" else DEFAULT_TEMPLATES))
        self.skipped_rows: list[tuple[int, str, str]] = []  # (row, file, reason) left out of the captions table
        self._classes = None if dataset == "captions" else ImageDataModule(
            "digits" if dataset == "digits" else "imagefolder", root=root, img_size=img_size, batch_size=batch_size,
            num_workers=num_workers, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
            in_chans=in_chans, mean=mean, std=std, augment=augment, hflip=False, crop_scale=crop_scale,
            color_jitter=0.0)
        names = class_names or (DIGIT_WORDS if dataset == "digits" else
                                self._classes.class_names if self._classes is not None else None)
        if names is not None and self._classes is not None and len(names) != self._classes.num_classes:
            raise ValueError(f"data.class_names: {len(names)} names for {self._classes.num_classes} classes "
                             f"({self._classes.class_names})")
        self.class_names = list(names) if names is not None else None
        default_mean, default_std = ((self._classes.mean, self._classes.std) if self._classes is not None
                                     else (IMAGENET_MEAN, IMAGENET_STD))
        self.mean = match_channels(mean if mean is not None else default_mean, in_chans)
        self.std = match_channels(std if std is not None else default_std, in_chans)
        self.save_hyperparameters()
        self.hparams.update(mean=list(self.mean), std=list(self.std))  # a checkpoint tells how to normalise
        self.train_set = self.val_set = self.test_set = None

    # ---- captions ----------------------------------------------------------------------------------------
    def caption(self, label: int, sample_seed: int | None = None) -> str:
        """The caption of class ``label``: a template drawn from ``sample_seed`` (training), else the first one."""
        index = 0 if sample_seed is None else int(np.random.default_rng(sample_seed).integers(len(self.templates)))
        return self.templates[index].format(self.class_names[label])

    def read_captions(self) -> list[tuple[str, str]]:
        """(image path, caption) of every usable row of ``root/captions_file``; bad rows skipped (warned, kept in
        ``skipped_rows`` as (row, file, reason)) or, with ``on_bad_row: error``, a ``ValueError`` naming them."""
        table = self.root / self.captions_file
        if not table.is_file():
            raise ValueError(f"data.root: {table} not found; expected a CSV with columns file,caption")
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("file", "caption") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{table}: the header needs the columns file and caption, got "
                                 f"{reader.fieldnames}")
            pairs, self.skipped_rows = [], []
            for row, entry in enumerate(reader, start=2):  # row 1 is the header
                file, caption = (entry.get("file") or "").strip(), (entry.get("caption") or "").strip()
                path = Path(file) if Path(file).is_absolute() else self.root / file
                reason = ("empty file name" if not file else "empty caption" if not caption else
                          "no such file" if not path.is_file() else check_image(path))
                if reason is None:
                    pairs.append((str(path), caption))
                elif self.on_bad_row == "error":
                    raise ValueError(f"{table}, row {row} ({file or 'no file'}): {reason}; set data.on_bad_row: skip "
                                     f"to leave such rows out")
                else:
                    self.skipped_rows.append((row, file, reason))
        if self.skipped_rows:
            row, file, reason = self.skipped_rows[0]
            warnings.warn(f"data: skipped {len(self.skipped_rows)} row(s) of {table} (first: row {row}, "
                          f"{file or 'no file'}: {reason})", stacklevel=2)
        if not pairs:
            raise ValueError(f"{table}: no usable rows")
        return pairs

    # ---- datasets ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self._classes is None:
            self._setup_captions()
            return
        classes = self._classes
        classes.mean, classes.std = self.mean, self.std  # a pretrained model's statistics, set by the CLI
        classes.setup(stage)
        self.train_set, self.val_set, self.test_set = (CaptionedDataset(d, self.caption) for d in
                                                       (classes.train_set, classes.val_set, classes.test_set))

    def _setup_captions(self) -> None:
        pairs = self.read_captions()
        files = sorted({path for path, _ in pairs})
        order = np.random.default_rng(self.seed).permutation(len(files))
        held_out = {files[i] for i in order[:int(round(len(files) * self.val_fraction))]}
        captions = [caption for _, caption in pairs]
        train = [(path, i) for i, (path, _) in enumerate(pairs) if path not in held_out]
        val = [(path, i) for i, (path, _) in enumerate(pairs) if path in held_out] or train
        train_tf = (eval_transform(self.img_size, self.mean, self.std) if self.augment == "none" else
                    train_transform(self.img_size, self.mean, self.std, augment="light", hflip=False,
                                    crop_scale=self.crop_scale, color_jitter=0.0))
        eval_tf = eval_transform(self.img_size, self.mean, self.std)

        def caption(row: int, sample_seed: int | None) -> str:
            return captions[row]

        self.train_set = CaptionedDataset(FileDataset(train, train_tf, self.in_chans, "skip"), caption)
        self.val_set = self.test_set = CaptionedDataset(FileDataset(val, eval_tf, self.in_chans, "skip"), caption)

    # ---- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # the shuffle, the templates drawn and the augmentation are functions of (seed, epoch, position)
        sampler = EpochSampler(len(dataset), self.seed, **process_share(self)) if train else None
        per_process = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=train and self.drop_last and per_process > self.batch_size,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
