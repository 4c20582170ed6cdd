"""``vit visualize``: where the model looks, as attention overlaid on an image (a PNG)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoints import CheckpointError
from ..deploy.predict import load_model, preprocess, top_classes
from ..features.attention import attention_map, save_overlay
from ..models.vision import VisionTransformer
from ._common import CommandParser, one_line


def _display_image(model: VisionTransformer, image_path: str) -> torch.Tensor:
    """The image as the model sees it (same resize and crop), in [0, 1] for display."""
    from ..data import eval_transform, load_image

    crop_pct = (getattr(model, "pretrained_cfg", None) or {}).get("crop_pct") or 1.0
    transform = eval_transform(model.img_size, (0.0,) * model.in_chans, (1.0,) * model.in_chans, crop_pct=crop_pct)
    return transform(image=load_image(image_path, model.in_chans))["image"]


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit visualize",
                                     description="Overlay the model's attention on an image and save a PNG.")
    parser.add_argument("image", help="an image file")
    parser.add_argument("--checkpoint", required=True,
                        help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--out", default="attention.png", help="PNG to write (default attention.png)")
    parser.add_argument("--method", default="rollout", choices=["rollout", "last"],
                        help="attention rollout over all layers, or the last layer's class-token attention")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint, image or argument).

    Example:
        >>> main(["cat.jpg", "--checkpoint", "my_vit/", "--out", "attn.png"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    try:
        model = load_model(options.checkpoint)
        x = preprocess(model, [options.image])
        heat = attention_map(model, x, options.method)[0]
        top = top_classes(model, x, topk=1)[0][0]  # the batch already decoded, not the file again
        out = save_overlay(_display_image(model, options.image), heat, options.out,
                           title=f"{Path(options.image).name}: {top[0]} ({top[1]:.2f}), {options.method}")
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
