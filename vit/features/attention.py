"""Where the model looks: attention rollout (or last-layer class-token attention) overlaid on an image.

    vit visualize IMAGE --checkpoint PATH --out attn.png [--method rollout|last]

Attention is fused (``scaled_dot_product_attention``) in ``forward``; ``model.attention_maps(x)`` recomputes
the weights on request, so visualising costs nothing during training.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.vision import VisionTransformer


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
