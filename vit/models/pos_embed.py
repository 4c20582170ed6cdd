"""Resampling of learned position embeddings and patch kernels (thin wrappers over timm's helpers)."""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed as _timm_resample_abs_pos_embed
from timm.layers import resample_patch_embed as _timm_resample_patch_embed


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """Resample (1, prefix + H*W, D) position embeddings to a new (H', W') grid.

    Prefix tokens (class / distillation) are kept apart and copied; the patch part is interpolated on
    its 2-D grid, so non-square grids work. ``old_grid`` defaults to a square grid.

    Example:
        >>> resample_pos_embed(torch.zeros(1, 1 + 4 * 4, 8), (6, 8)).shape
        torch.Size([1, 49, 8])
    """
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is not None and tuple(old_grid) == new_grid and num_patches == new_grid[0] * new_grid[1]:
        return pos_embed
    return _timm_resample_abs_pos_embed(pos_embed, new_size=list(new_grid),
                                        old_size=list(old_grid) if old_grid is not None else None,
                                        num_prefix_tokens=num_prefix_tokens, interpolation=interpolation,
                                        antialias=antialias)


def resample_patch_kernel(weight: torch.Tensor, new_patch: tuple[int, int], interpolation: str = "bicubic",
                          antialias: bool = True) -> torch.Tensor:
    """Resample a (D, C, p, p) patch-embedding kernel to a new patch size (FlexiViT's pseudo-inverse resize).

    Example:
        >>> resample_patch_kernel(torch.randn(8, 3, 16, 16), (8, 8)).shape
        torch.Size([8, 3, 8, 8])
    """
    new_patch = (int(new_patch[0]), int(new_patch[1]))
    if tuple(weight.shape[-2:]) == new_patch:
        return weight
    return _timm_resample_patch_embed(weight, list(new_patch), interpolation=interpolation, antialias=antialias)
