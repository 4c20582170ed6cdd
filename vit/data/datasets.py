"""Small datasets yielding (numpy HWC uint8 image, label): digits (embedded), image folders, CIFAR."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

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

    def __getitem__(self, i: int):
        j = self.indices[i]
        image = self.images[j]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, int(self.labels[j])


def load_digits_arrays(in_chans: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 1,797 8x8 handwritten digits as (N, 8, 8, C) uint8 and labels 0-9."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[..., None]
    return np.repeat(images, in_chans, axis=-1), digits.target.astype(np.int64)


def load_image(path: str | Path, in_chans: int = 3) -> np.ndarray:
    """Decode an image file to HWC uint8 with ``in_chans`` channels (EXIF rotation applied; palette,
    grayscale, RGBA, CMYK and 16-bit images converted)."""
    with Image.open(path) as img:
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
    """Image files with integer labels, decoded on access."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None, in_chans: int = 3):
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = load_image(path, self.in_chans)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, label


def find_classes(folder: Path) -> list[str]:
    """Class names: the visible sub-folders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(folder: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) for every image file under ``folder/<class>/`` (hidden files/folders and non-images skipped)."""
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for name in find_classes(folder):
        if name not in index:
            raise ValueError(f"{folder}: class folder {name!r} is not among the training classes {list(class_names)}")
        for path in sorted((folder / name).rglob("*")):
            rel = path.relative_to(folder / name)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(path), index[name]))
    return samples
