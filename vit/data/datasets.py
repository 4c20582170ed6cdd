"""In-memory datasets yielding (numpy HWC uint8 image, label): digits (embedded) and CIFAR arrays."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from .sampling import seed_transform, split_index

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
