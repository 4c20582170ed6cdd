"""Small datasets yielding (numpy HWC uint8 image, label): digits (embedded), image folders, CIFAR."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .sampling import seed_transform, split_index

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ArrayDataset(Dataset):
    """In-memory images (N, H, W, C) uint8 with integer labels, optionally a subset by index."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None,
                 indices: Sequence[int] | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        i, sample_seed = split_index(i)
        j = self.indices[i]
        image = self.images[j]
        if self.transform is not None:
            if sample_seed is not None:
                seed_transform(self.transform, sample_seed)
            image = self.transform(image=image)["image"]
        return image, int(self.labels[j])


def load_digits_arrays(in_chans: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 1,797 8x8 handwritten digits as (N, 8, 8, C) uint8 and labels 0-9."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[..., None]
    return np.repeat(images, in_chans, axis=-1), digits.target.astype(np.int64)


class BadImageError(ValueError):
    """An image file that cannot be used (empty, not an image, truncated, corrupt, over Pillow's size guard)."""

    def __init__(self, path: str | Path, reason: str | None = None):
        # one argument: torch re-raising a worker's error with the full message
        super().__init__(f"bad image {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable, so it crosses from a loader worker with its message intact
        return BadImageError, (self.path, self.reason)


def load_image(path: str | Path, in_chans: int = 3) -> np.ndarray:
    """Decode an image file to HWC uint8 with ``in_chans`` channels (EXIF rotation applied; palette,
    grayscale, RGBA, CMYK and 16-bit images converted). Any file that cannot be decoded raises
    ``BadImageError`` naming the file and the reason.

    Example:
        >>> load_image("missing.png")
        Traceback (most recent call last):
        ...
        vit.data.datasets.BadImageError: bad image missing.png: file not found
    """
    try:
        return _decode(path, in_chans)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Exception as err:  # Pillow's plugins raise many types on garbage; callers need one
        raise BadImageError(path, bad_image_reason(err)) from None


def bad_image_reason(err: BaseException) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"too large for Pillow's decompression-bomb guard ({err}); if the file is trusted, raise "
                f"PIL.Image.MAX_IMAGE_PIXELS")
    text = str(err).strip() or type(err).__name__
    if "cannot identify image file" in text:
        return "not an image Pillow can read"
    return text


def _decode(path: str | Path, in_chans: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits instead of clipping.
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray(np.clip(arr / max(float(arr.max()), 1.0) * 255.0, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("L" if in_chans == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


class FileDataset(Dataset):
    """Image files with integer labels, decoded on access.

    A file that fails to decode (the folder scan checks headers, not every pixel) raises ``BadImageError``
    with ``on_bad_image="error"``; with ``"skip"`` the next file takes its place (with its own label, so a
    label is never wrong), and the path and reason are appended to ``skip_log`` if given.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None, in_chans: int = 3,
                 on_bad_image: str = "error", skip_log: str | Path | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans
        self.on_bad_image = on_bad_image
        self.skip_log = skip_log
        self._warned = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        i, sample_seed = split_index(i)
        for attempt in range(min(len(self.samples), 16)):
            path, label = self.samples[(i + attempt) % len(self.samples)]
            try:
                image = load_image(path, self.in_chans)
                break
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise
                self._record_skip(err)
        else:
            raise BadImageError(self.samples[i][0], "this and the following files could not be decoded")
        if self.transform is not None:
            if sample_seed is not None:
                seed_transform(self.transform, sample_seed)
            image = self.transform(image=image)["image"]
        return image, label

    def _record_skip(self, err: BadImageError) -> None:
        if self.skip_log is not None:
            with open(self.skip_log, "a", encoding="utf-8") as f:  # one short line: appends don't interleave
                f.write(f"{err.path}\t{err.reason}\n")
        if not self._warned:
            self._warned = True
            where = f"; listed in {self.skip_log}" if self.skip_log else ""
            warnings.warn(f"skipping images that fail to decode (first: {err.path}: {err.reason}){where}",
                          stacklevel=2)


def find_classes(folder: Path) -> list[str]:
    """Class names: the visible sub-folders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(folder: Path, class_names: Sequence[str], on_bad_image: str | None = None,
                      skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
    """(path, label) for every image file under ``folder/<class>/`` (hidden files/folders and non-images skipped).

    With ``on_bad_image`` set, each file's header is checked (cached per folder, see ``vit.data.scan``):
    ``"error"`` raises ``BadImageError`` for the first bad file, ``"skip"`` leaves it out and appends
    ``(path, reason)`` to ``skipped``; a class folder missing from ``class_names`` is skipped the same way.
    """
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for name in find_classes(folder):
        files = []
        for path in sorted((folder / name).rglob("*")):
            rel = path.relative_to(folder / name)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
        if name not in index:
            if on_bad_image != "skip" or skipped is None:
                raise ValueError(f"{folder}: class folder {name!r} is not among the training classes "
                                 f"{list(class_names)}")
            reason = f"class {name!r} is not among the training classes"
            skipped.extend((str(p), reason) for p in files)
            continue
        if on_bad_image is not None:
            from .scan import check_images
            problems = check_images(folder, files)
            for path in files:
                reason = problems.get(str(path))
                if reason is None:
                    samples.append((str(path), index[name]))
                elif on_bad_image == "skip" and skipped is not None:
                    skipped.append((str(path), reason))
                else:
                    raise BadImageError(path, reason + "; set data.on_bad_image: skip to leave such files out")
        else:
            samples.extend((str(p), index[name]) for p in files)
    return samples
