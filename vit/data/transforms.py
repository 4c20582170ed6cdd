"""Albumentations presets: numpy HWC uint8 in, normalised CHW float tensor out."""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: F401  (re-exported)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: F401

AUGMENT_PRESETS = ("none", "light", "strong")


def train_transform(img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                    augment: str = "light", hflip: bool = True, crop_scale: Sequence[float] = (0.08, 1.0),
                    color_jitter: float = 0.4, random_erasing: float = 0.0, crop_padding: int = 0) -> A.Compose:
    """Training pipeline: random resized crop, flip, colour jitter (``light``), plus RandAugment-style
    ops (``strong``), then normalise; ``random_erasing`` is the probability of erasing a random box.
    ``crop_padding > 0`` replaces the random resized crop by CIFAR's crop: resize to ``img_size``, pad each side by
    ``crop_padding`` pixels (reflected), cut ``img_size`` at a random position; no resampling of the kept pixels,
    which matters at 32 px.

    Example:
        >>> import numpy as np
        >>> train_transform(32, (0.5,) * 3, (0.5,) * 3)(image=np.zeros((40, 40, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment: expected one of {AUGMENT_PRESETS}, got {augment!r}")
    size = _size(img_size)
    if augment == "none":
        return eval_transform(img_size, mean, std)
    if crop_padding > 0:
        ops: list = [A.Resize(*size, interpolation=cv2.INTER_CUBIC),
                     A.PadIfNeeded(size[0] + 2 * crop_padding, size[1] + 2 * crop_padding,
                                   border_mode=cv2.BORDER_REFLECT_101),
                     A.RandomCrop(*size)]
    else:
        ops = [A.RandomResizedCrop(size=size, scale=tuple(crop_scale), interpolation=cv2.INTER_CUBIC)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if augment == "strong":
        # RandAugment-style: two of a pool of photometric/geometric ops at moderate magnitude.
        ops.append(A.SomeOf([
            A.Affine(rotate=(-15, 15), p=1.0), A.Affine(shear=(-15, 15), p=1.0),
            A.Affine(translate_percent=(-0.1, 0.1), p=1.0), A.Posterize(num_bits=(4, 6), p=1.0),
            A.Solarize(threshold_range=(0.5, 1.0), p=1.0), A.Equalize(p=1.0), A.Sharpen(p=1.0),
            A.RandomBrightnessContrast(0.3, 0.3, p=1.0), A.AutoContrast(p=1.0),
        ], n=2, p=0.9))
    if color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0,
                                 p=0.8))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    if random_erasing > 0:
        ops.insert(-1, A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.4),
                                       hole_width_range=(0.1, 0.4), fill=0, p=random_erasing))
    return A.Compose(ops)


def eval_transform(img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = 1.0) -> A.Compose:
    """Evaluation pipeline: resize the short side to ``img_size / crop_pct``, center crop, normalise.

    Example:
        >>> import numpy as np
        >>> eval_transform(32, (0.5,) * 3, (0.5,) * 3)(image=np.zeros((8, 8, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct: expected a value in (0, 1], got {crop_pct}")
    size = _size(img_size)
    resize = [int(round(s / crop_pct)) for s in size]
    return A.Compose([
        A.SmallestMaxSize(max_size_hw=(resize[0], resize[1]), interpolation=cv2.INTER_CUBIC),  # covers both sides
        A.CenterCrop(*size),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ToTensorV2(),
    ])


def match_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """A per-channel statistic for ``in_chans`` channels: repeated from one value, or the mean of an RGB
    statistic for a grayscale model.

    Example:
        >>> match_channels((0.5,), 3)
        (0.5, 0.5, 0.5)
    """
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return (sum(values) / len(values),) * in_chans


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[0]), int(img_size[1])
