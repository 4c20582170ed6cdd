"""Tiny fixtures shared by the tests: small models and small image folders, all offline."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# VIT_TEST_THREADS=1 keeps tests usable while other jobs share the cores (OpenMP spin-waits oversubscribe badly)
torch.set_num_threads(int(os.environ.get("VIT_TEST_THREADS", min(2, os.cpu_count() or 1))))

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


@pytest.fixture
def tiny_model():
    import vit
    torch.manual_seed(0)
    return vit.VisionTransformer(**TINY).eval()


def write_image_folder(root, classes=("cat", "dog"), per_class=8, size=24, splits=("train", "val"), seed=0):
    """Write a small folder of PNGs whose class is visible (a bright square in a class-specific corner)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                h = size // 2
                y, x = (c // 2) % 2 * h, c % 2 * h
                img[y:y + h, x:x + h, c % 3] = 230
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")
