"""Convert any supported checkpoint to our directory layout (config.json + model.safetensors).

    vit convert SOURCE OUTPUT_DIR [--img-size N] [--num-classes N] [--num-heads N] [--act-layer ACT]

SOURCE is a file, a directory, ``hf-hub:ORG/REPO`` or ``timm:model.tag``. It prints what it detected.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoints import CheckpointError, architecture_of, load_pretrained, save_pretrained
from ..models.config import ViTConfig
from ._common import CommandParser


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="vit convert",
        description="Convert timm / DeiT / torchvision / Hugging Face / Google .npz / Lightning weights "
                    "to config.json + model.safetensors.")
    parser.add_argument("source", help="a file, a directory, hf-hub:ORG/REPO or timm:model.tag")
    parser.add_argument("output_dir", help="directory to write config.json and model.safetensors to")
    parser.add_argument("--img-size", type=int, default=None, help="resample position embeddings to this size")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="re-initialise the head for this many classes (0 = no head)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for files that do not record them (torchvision, bare timm)")
    parser.add_argument("--act-layer", default=None, choices=["gelu", "gelu_tanh", "quick_gelu", "silu"],
                        help="MLP activation, which weights do not record: quick_gelu for OpenAI CLIP files "
                             "without a config (a config or timm name says it otherwise)")
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "nearest"],
                        help="how to resample position embeddings (default bicubic)")
    return parser


def _model_hint(options: argparse.Namespace) -> dict | None:
    """What the file cannot tell, from the command line."""
    hint = {"num_heads": options.num_heads, "act_layer": options.act_layer}
    return {k: v for k, v in hint.items() if v is not None} or None


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad source or arguments).

    Example:
        >>> main(["vit_tiny.pth", "converted/", "--num-classes", "10"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = load_pretrained(options.source, num_classes=options.num_classes, img_size=options.img_size,
                                model=_model_hint(options),
                                interpolation=options.interpolation)
        out = save_pretrained(model, options.output_dir)
    except (CheckpointError, ValueError, OSError) as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    cfg, arch = model.pretrained_cfg, architecture_of(model)
    print(f"detected: {cfg['format']} checkpoint ({cfg['file']})")
    core = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool", "norm_eps")
    defaults = ViTConfig().to_dict(training=False)
    extra = [k for k in arch if k not in core and k != "num_classes" and arch[k] != defaults[k]]
    print("architecture: " + ", ".join(f"{k}={arch[k]}" for k in (*core, *extra)))
    names = cfg["class_names"]
    shown = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
    print(f"classes: {cfg['num_classes']}{shown}")
    print(f"normalisation: mean={cfg['mean']} std={cfg['std']} interpolation={cfg['interpolation']}")
    print(f"wrote: {out / 'config.json'}, {out / 'model.safetensors'}")
    return 0
