"""Classify images with a trained model and print the top-k class names.

    vit predict IMAGE [IMAGE ...] --checkpoint PATH [--topk 5] [--backend auto] [--precision auto]

PATH is anything ``vit.load_pretrained`` reads: our Lightning ``.ckpt``, a ``save_pretrained`` directory, timm /
Hugging Face weights, ... Images are normalised with the checkpoint's mean/std and resized as in evaluation,
decoded in loader worker processes and run in batches of ``--batch-size`` by the backend of ``vit.deploy.runners``
(``--backend auto --precision auto``: the fastest measured here whose answers match eager PyTorch fp32 on the
first images).
For a whole folder with a CSV, use ``python train.py predict --config ... --ckpt_path ... --data.predict_path``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import load_pretrained
from ..models.vision import VisionTransformer
from .runners import PROBE_SIZE, Runner, create_runner


def load_model(checkpoint: str) -> VisionTransformer:
    """The model of ``checkpoint`` in eval mode (its ``pretrained_cfg`` carries class names and mean/std)."""
    return load_pretrained(checkpoint).eval()


def preprocess(model: VisionTransformer, paths: Sequence[str | Path]) -> torch.Tensor:
    """Images -> (B, C, H, W) the way the model was evaluated: resize + center crop to its size, its mean/std.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGB", (64, 48)).save(f"{tmp}/cat.png")
        ...     preprocess(model, [f"{tmp}/cat.png"]).shape
        torch.Size([1, 3, 32, 32])
    """
    _check_files(paths)
    files = ImageFiles(model, paths)
    images = [files.decode(i) for i in range(len(files))]  # BadImageError names the file
    return torch.stack(images)


class ImageFiles(Dataset):
    """Image files decoded and transformed for ``model`` as in evaluation; an item that cannot be decoded is
    returned as its error (so it crosses from a loader worker intact and is raised, one line, by ``predict``)."""

    def __init__(self, model: VisionTransformer, paths: Sequence[str | Path]):
        from ..data import eval_transform
        from ..data.transforms import match_channels

        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD  # bare state dict: ImageNet's
        mean, std = match_channels(mean, model.in_chans), match_channels(std, model.in_chans)
        self.transform = eval_transform(model.img_size, mean, std, crop_pct=cfg.get("crop_pct") or 1.0)
        self.paths, self.in_chans = list(paths), model.in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> torch.Tensor:
        from ..data import load_image
        return self.transform(image=load_image(self.paths[index], self.in_chans))["image"]

    def __getitem__(self, index: int) -> torch.Tensor | Exception:
        try:
            return self.decode(index)
        except (ValueError, OSError) as error:
            return error


def _collate(items: list) -> torch.Tensor | Exception:
    errors = [item for item in items if isinstance(item, Exception)]
    return errors[0] if errors else torch.stack(items)


def image_loader(model: VisionTransformer, paths: Sequence[str | Path], batch_size: int = 32,
                 workers: int | None = None) -> DataLoader:
    """Batches (B, C, H, W) of ``paths`` in order, decoded by ``workers`` processes (default: none for a single
    batch, else one) while the model runs on the previous batch. torch gives each worker one thread; nothing
    else is set in the workers (OpenCV's thread pool, reconfigured in a forked child, can hang it)."""
    if workers is None:
        workers = 0 if len(paths) <= batch_size else 1
    return DataLoader(ImageFiles(model, paths), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      prefetch_factor=2 if workers else None)


def calibration_images(model: VisionTransformer, source: str | Path, limit: int = 64) -> torch.Tensor:
    """Up to ``limit`` images of a folder (recursive, sorted; spread over it) or ``.txt`` list, preprocessed for
    ``model``: the int8 calibration set of ``--calibration``."""
    from .detect import image_files
    paths = image_files([source])
    step = max(1, len(paths) // limit)
    return preprocess(model, paths[::step][:limit])


def _check_files(paths: Sequence[str | Path]) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such image file")


def predict(model: VisionTransformer | Runner, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 32,
            backend: str = "auto", precision: str | None = "auto", workers: int | None = None, *,
            calibration: torch.Tensor | None = None, log=None, **old) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image, most likely first.

    ``model`` is a model (then the runner for ``backend``/``precision`` is built and checked on the first images,
    int8 calibrated on ``calibration`` else on them, and its choice printed through ``log``; see
    ``vit.deploy.runners.create_runner``, which also takes the old ``quantize=``) or a runner built before.

    Example:
        >>> predict(load_model("runs/vit/version_0/checkpoints/last.ckpt"), ["cat.jpg"], topk=2)  # doctest: +SKIP
        [[('cat', 0.93...), ('dog', 0.05...)]]
    """
    _check_files(paths)
    source = model.model if isinstance(model, Runner) else model
    runner = model if isinstance(model, Runner) else None
    results = []
    for images in image_loader(source, paths, batch_size, workers):
        if isinstance(images, Exception):
            raise images
        if runner is None:
            runner = create_runner(source, backend, precision, probe=images[:PROBE_SIZE], calibration=calibration,
                                   log=log, **old)
        results += top_classes(runner, images, topk)
    return results


@torch.no_grad()
def top_classes(model: VisionTransformer | Runner, images: torch.Tensor, topk: int = 5
                ) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for a preprocessed batch (B, C, H, W)."""
    source = model.model if isinstance(model, Runner) else model
    names = (getattr(source, "pretrained_cfg", None) or {}).get("class_names") or \
        [str(i) for i in range(source.num_classes)]
    probs = model(images).float().softmax(dim=-1)
    values, labels = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    return [[(names[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, labels)]
