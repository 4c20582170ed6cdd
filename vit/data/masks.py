"""Images with per-pixel labels, before any transform: the readers of mask folders, Pascal VOC and ADE20K, the
checks every sample passes (mask present and readable, same size as its image, every value a class or the ignore
index) and the error a sample that fails them raises.

Masks are single-channel index PNGs: a pixel's value is its class (0..K-1) or the ignore index (255). A palette
("P" mode) PNG, as VOC ships, is read as its indices, never converted to RGB colours.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, BadImageError, bad_image_reason, load_image

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# the split folders / list files of each layout, by our split names
DEFAULT_SPLIT_NAMES = {"folder": {"train": "train", "val": "val", "test": "test"},
                       "voc": {"train": "train", "val": "val", "test": "test"},
                       "ade20k": {"train": "training", "val": "validation", "test": "testing"}}


class BadSampleError(BadImageError):
    """A segmentation sample that cannot be used: its file and what is wrong (values found, sizes, ...)."""

    def __init__(self, path: str | Path, reason: str | None = None):
        ValueError.__init__(self, f"bad sample {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable, so it crosses from a loader worker with its message intact
        return BadSampleError, (self.path, self.reason)


@dataclass(frozen=True)
class SegmentationSample:
    """One image and its mask: file paths, or (the synthetic set) HWC / HW uint8 arrays; ``name`` for messages."""
    image: str | np.ndarray
    mask: str | np.ndarray
    name: str


def read_mask(path: str | Path) -> np.ndarray:
    """A single-channel index PNG as an (H, W) integer array: palette images give their indices (never colours),
    grayscale their values. A colour image, a missing or an unreadable file raises ``BadSampleError``.

    Example:
        >>> read_mask("missing.png")
        Traceback (most recent call last):
        ...
        vit.data.masks.BadSampleError: bad sample missing.png: mask file not found
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            mask = np.asarray(img)
    except FileNotFoundError:
        raise BadSampleError(path, "mask file not found") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types on garbage
        raise BadSampleError(path, f"unreadable mask ({bad_image_reason(err)})") from None
    if mask.ndim != 2:
        raise BadSampleError(path, f"mask has {mask.shape[2] if mask.ndim == 3 else mask.ndim} channels (mode "
                                   f"{mode}); expected a single-channel index PNG (mode L or P)")
    return mask.astype(np.uint8) if mode in ("1", "L", "P") else mask.astype(np.int32)


def load_sample(sample: SegmentationSample, num_classes: int, ignore_index: int = 255,
                reduce_zero_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The sample's (HWC uint8 image, HW mask) after the checks; ``reduce_zero_label`` (ADE20K) makes 0 the ignore
    index and shifts every other label down by one. Raises ``BadSampleError`` naming the file and the problem.

    Example:
        >>> sample = SegmentationSample(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 7, np.uint8), "demo")
        >>> load_sample(sample, num_classes=3)
        Traceback (most recent call last):
        ...
        vit.data.masks.BadSampleError: bad sample demo: label value(s) [7] are neither a class (0..2) nor the ignore index 255
    """
    image_name = sample.image if isinstance(sample.image, (str, Path)) else sample.name
    mask_name = sample.mask if isinstance(sample.mask, (str, Path)) else sample.name
    if isinstance(sample.image, np.ndarray):
        image = sample.image
    else:
        try:
            image = load_image(sample.image, 3)
        except BadImageError as err:
            raise BadSampleError(image_name, f"unreadable image ({err.reason})") from None
    mask = sample.mask if isinstance(sample.mask, np.ndarray) else read_mask(sample.mask)
    if mask.shape != image.shape[:2]:
        raise BadSampleError(mask_name, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                                        f"{image.shape[1]}x{image.shape[0]} ({image_name})")
    if reduce_zero_label:
        mask = mask.astype(np.int32)
        shifted = mask - 1
        shifted[mask == 0] = ignore_index
        shifted[mask == ignore_index] = ignore_index
        mask = shifted
    values = np.unique(mask)
    bad = values[((values >= num_classes) | (values < 0)) & (values != ignore_index)]
    if len(bad):
        shown = bad[:10].tolist()
        raise BadSampleError(mask_name, f"label value(s) {shown}{' ...' if len(bad) > 10 else ''} are neither a "
                                        f"class (0..{num_classes - 1}) nor the ignore index {ignore_index}")
    return image, mask


# ---- layouts -----------------------------------------------------------------------------------------------
def read_class_names(path: Path) -> list[str]:
    """One class name per line (line i = class i), blank lines left out."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def folder_class_names(root: Path) -> list[str]:
    listed = root / "classes.txt"
    if not listed.is_file():
        raise FileNotFoundError(f"data.root: {listed} not found (a mask folder names its classes there, one per "
                                f"line: line i is class i)")
    return read_class_names(listed)


def voc_segmentation_class_names(root: Path) -> list[str]:
    """``root/classes.txt`` when present, else VOC's 21 classes (background first)."""
    listed = root / "classes.txt"
    return read_class_names(listed) if listed.is_file() else list(VOC_CLASSES)


def ade20k_class_names(root: Path) -> list[str]:
    """``root/classes.txt`` when present, else the names in ADEChallengeData2016's ``objectInfo150.txt``/``.csv``
    (the first of each name's synonyms)."""
    listed = root / "classes.txt"
    if listed.is_file():
        return read_class_names(listed)
    for name, sep in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        info = root / name
        if info.is_file():
            rows = [line.split(sep) for line in info.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
            return [row[-1].strip().strip('"').split(";")[0].strip() for row in rows]
    raise FileNotFoundError(f"data.root: neither {listed} nor {root / 'objectInfo150.txt'} found (the ADE20K class "
                            f"names, one per line without the 'other' class 0 that reduce_zero_label drops)")


def folder_samples(root: Path, split: str) -> list[SegmentationSample]:
    """``root/images/<split>/*`` with ``root/masks/<split>/<stem>.png`` (a missing mask is reported when read)."""
    images = _image_files(root / "images" / split)
    return [SegmentationSample(str(p), str(root / "masks" / split / f"{p.stem}.png"), str(p)) for p in images]


def ade20k_samples(root: Path, split: str) -> list[SegmentationSample]:
    """``root/images/<split>/*.jpg`` with ``root/annotations/<split>/<stem>.png``."""
    images = _image_files(root / "images" / split)
    return [SegmentationSample(str(p), str(root / "annotations" / split / f"{p.stem}.png"), str(p)) for p in images]


def voc_samples(root: Path, split: str) -> list[SegmentationSample]:
    """The ids of ``root/ImageSets/Segmentation/<split>.txt``: ``JPEGImages/<id>.jpg`` (or another image
    extension) with ``SegmentationClass/<id>.png``."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = []
    for stem in ids:
        image = root / "JPEGImages" / f"{stem}.jpg"
        if not image.is_file():
            image = next((root / "JPEGImages" / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS
                          if (root / "JPEGImages" / f"{stem}{ext}").is_file()), image)
        samples.append(SegmentationSample(str(image), str(root / "SegmentationClass" / f"{stem}.png"), str(image)))
    return samples


def split_exists(dataset: str, root: Path, name: str) -> bool:
    """Whether a layout has the split called ``name`` (its folder or list file)."""
    if dataset == "voc":
        return (root / "ImageSets" / "Segmentation" / f"{name}.txt").is_file()
    return (root / "images" / name).is_dir()


READERS = {"folder": (folder_class_names, folder_samples),
           "voc": (voc_segmentation_class_names, voc_samples),
           "ade20k": (ade20k_class_names, ade20k_samples)}


def write_mask_folder(samples: Sequence[tuple[np.ndarray, np.ndarray]], class_names: Sequence[str],
                      root: str | Path, split: str = "train") -> Path:
    """Write ``(image, mask)`` arrays as a mask folder (PNG images, single-channel index PNG masks) and its
    ``classes.txt``; returns ``root``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     root = write_mask_folder([(np.zeros((4, 6, 3), np.uint8), np.ones((4, 6), np.uint8))], ["a", "b"], tmp)
        ...     [s.name.endswith("000000.png") for s in folder_samples(root, "train")], read_mask(
        ...         root / "masks" / "train" / "000000.png").shape
        ([True], (4, 6))
    """
    root = Path(root)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    for i, (image, mask) in enumerate(samples):
        Image.fromarray(np.asarray(image)).save(root / "images" / split / f"{i:06d}.png")
        Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(root / "masks" / split / f"{i:06d}.png")
    return root


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: {folder} not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)
