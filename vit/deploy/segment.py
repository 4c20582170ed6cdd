"""Prediction with a segmentation checkpoint: an index mask and an overlay for each image file (what ``vit predict``
does when the checkpoint is a ``Segmenter``'s)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.images import load_image
from .detect import checkpoint_hparams


def is_segmentation_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint of our ``Segmenter`` (its hyper-parameters name a head and an
    ignore index).

    Example:
        >>> is_segmentation_checkpoint("my_vit/")
        False
    """
    hparams = checkpoint_hparams(path)
    return "head" in hparams and "ignore_index" in hparams


def load_segmenter(path: str | Path):
    """The ``Segmenter`` of a Lightning checkpoint, in eval mode (read with ``weights_only=True``)."""
    from ..tasks.segmentation import Segmenter
    return Segmenter.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


@torch.inference_mode()
def segment(model, image: np.ndarray) -> np.ndarray:
    """One HWC uint8 image's class per pixel (H, W) uint8, at the image's own size, from the model's sliding
    windows."""
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]
    return model.predict_logits(images)[0].argmax(dim=0).to(torch.uint8).numpy()


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct and the same for every run (class 0 black, as VOC's background).

    Example:
        >>> palette(3).tolist()
        [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    """
    colours = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):  # VOC's bit-interleaved colour map
        c, value = k, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                value[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        colours[k] = value
    return colours


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """The image with each pixel's class colour blended in (``alpha`` of the colour)."""
    colours = palette(num_classes)[mask]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def predict_masks(model, files: Sequence[Path], out: str | Path) -> list[np.ndarray]:
    """For each image: ``out/<stem>.png``, its class indices as a palette PNG (read back as indices, shown in
    colour), and ``out/<stem>_overlay.png``; returns the masks."""
    from PIL import Image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(model.hparams.num_classes)
    colours = palette(max(num_classes, 1)).flatten().tolist()
    masks = []
    for path in files:
        image = load_image(path, 3)
        mask = segment(model, image)
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette(colours + [0] * (768 - len(colours)))
        indexed.save(out / f"{path.stem}.png")
        Image.fromarray(overlay(image, mask, num_classes)).save(out / f"{path.stem}_overlay.png")
        masks.append(mask)
    return masks
