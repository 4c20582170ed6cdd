"""Classify a few images with a trained model and print the top-k class names.

    python -m vit.predict IMAGE [IMAGE ...] --checkpoint PATH [--topk 5]

PATH is anything ``vit.load_pretrained`` reads: our Lightning ``.ckpt``, a ``save_pretrained`` directory, timm /
Hugging Face weights, ... Images are normalised with the checkpoint's mean/std and resized as in evaluation.
For a whole folder with a CSV, use ``python train.py predict --config ... --ckpt_path ... --data.predict_path``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from .checkpoints import CheckpointError, load_pretrained
from .model import VisionTransformer


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
    from .data import eval_transform, load_image
    from .data.transforms import match_channels

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD  # a bare state dict: ImageNet's
    mean, std = match_channels(mean, model.in_chans), match_channels(std, model.in_chans)
    transform = eval_transform(model.img_size, mean, std, crop_pct=cfg.get("crop_pct") or 1.0)
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        images.append(transform(image=load_image(path, model.in_chans))["image"])  # BadImageError names the file
    return torch.stack(images)


@torch.no_grad()
def predict(model: VisionTransformer, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 32
            ) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image, most likely first.

    Example:
        >>> predict(load_model("runs/vit/version_0/checkpoints/last.ckpt"), ["cat.jpg"], topk=2)  # doctest: +SKIP
        [[('cat', 0.93...), ('dog', 0.05...)]]
    """
    results = []
    for start in range(0, len(paths), batch_size):
        results += top_classes(model, preprocess(model, paths[start:start + batch_size]), topk)
    return results


@torch.no_grad()
def top_classes(model: VisionTransformer, images: torch.Tensor, topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for a preprocessed batch (B, C, H, W)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("class_names") or \
        [str(i) for i in range(model.num_classes)]
    probs = model(images).float().softmax(dim=-1)
    values, labels = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    return [[(names[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, labels)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vit.predict", description="Top-k classes for a few images.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True,
                        help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model under torch.compile (pays off on GPUs and for many images)")
    return parser


def one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint, image or argument).

    Example:
        >>> main(["cat.jpg", "--checkpoint", "my_vit/", "--topk", "3"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if options.topk < 1:
        print(f"error: --topk: expected a positive integer, got {options.topk}", file=sys.stderr)
        return 2
    try:
        model = load_model(options.checkpoint)
        if options.compile:
            model.compile()  # in place, so the module keeps its attributes (class names, img_size)
        results = predict(model, options.images, options.topk)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for path, top in zip(options.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
