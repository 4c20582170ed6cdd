"""Where the model looks: attention rollout (or last-layer class-token attention) overlaid on an image.

    python -m vit.visualize IMAGE --checkpoint PATH --out attn.png [--method rollout|last]

Attention is fused (``scaled_dot_product_attention``) in ``forward``; ``model.attention_maps(x)`` recomputes
the weights on request, so visualising costs nothing during training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from .model import VisionTransformer
from .predict import load_model, one_line, preprocess, top_classes


def attention_rollout(maps: list[torch.Tensor], num_prefix_tokens: int = 1, method: str = "rollout") -> torch.Tensor:
    """(B, N_patches) relevance of each patch for the class token.

    ``rollout`` (Abnar & Zuidema 2020): per layer, heads averaged, identity added for the residual path, rows
    renormalised, then the layers multiplied. ``last``: the last layer's class-token attention, heads averaged.
    Without a class token the mean over all query tokens is used.

    Example:
        >>> maps = [torch.softmax(torch.randn(1, 2, 5, 5), -1) for _ in range(2)]
        >>> attention_rollout(maps).shape
        torch.Size([1, 4])
    """
    if method not in ("rollout", "last"):
        raise ValueError(f"method: expected 'rollout' or 'last', got {method!r}")
    if method == "last":
        joint = maps[-1].float().mean(dim=1)  # (B, heads, N, N) -> (B, N, N)
    else:
        joint = None
        for attn in maps:
            a = attn.float().mean(dim=1)
            a = a + torch.eye(a.shape[-1], device=a.device)
            a = a / a.sum(dim=-1, keepdim=True)
            joint = a if joint is None else a @ joint
    rows = joint[:, 0] if num_prefix_tokens > 0 else joint.mean(dim=1)
    return rows[:, num_prefix_tokens:]


def attention_map(model: VisionTransformer, x: torch.Tensor, method: str = "rollout") -> torch.Tensor:
    """(B, H, W) heat map in [0, 1] at the input resolution."""
    grid = model.patch_embed.grid_size
    relevance = attention_rollout(model.attention_maps(x), model.num_prefix_tokens, method)
    heat = relevance.reshape(-1, 1, *grid)
    heat = torch.nn.functional.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = heat.flatten(1).min(dim=1).values[:, None, None]
    high = heat.flatten(1).max(dim=1).values[:, None, None]
    return (heat - low) / (high - low).clamp(min=1e-12)


def save_overlay(image: torch.Tensor, heat: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Write the image, the heat map and the overlay side by side as a PNG. ``image`` is (C, H, W) in [0, 1]."""
    from matplotlib.figure import Figure

    shown = image.permute(1, 2, 0).clamp(0, 1).numpy()
    cmap = "gray" if shown.shape[-1] == 1 else None
    shown = shown[..., 0] if shown.shape[-1] == 1 else shown
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("image")
    axes[1].imshow(heat.numpy(), cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title("attention")
    axes[2].imshow(shown, cmap=cmap)
    axes[2].imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _display_image(model: VisionTransformer, image_path: str) -> torch.Tensor:
    """The image as the model sees it (same resize and crop), in [0, 1] for display."""
    from .data import eval_transform, load_image

    crop_pct = (getattr(model, "pretrained_cfg", None) or {}).get("crop_pct") or 1.0
    transform = eval_transform(model.img_size, (0.0,) * model.in_chans, (1.0,) * model.in_chans, crop_pct=crop_pct)
    return transform(image=load_image(image_path, model.in_chans))["image"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vit.visualize",
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


if __name__ == "__main__":
    sys.exit(main())
