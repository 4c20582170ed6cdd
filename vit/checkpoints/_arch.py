"""Architecture of a checkpoint (inferred from tensor shapes + config hints) and of a model (its arguments)."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..model import VisionTransformer
from ._common import CheckpointError


def architecture_of(model: VisionTransformer, training: bool = False) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (with ``training=True`` also its dropout rates).

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
        >>> architecture_of(m)["depth"], architecture_of(m)["img_size"]
        (2, 32)
    """
    block = model.blocks[0]
    height, width = model.img_size
    arch = dict(
        img_size=height if height == width else [height, width], patch_size=model.patch_size,
        in_chans=model.in_chans, num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, global_pool=model.global_pool,
        class_token=model.cls_token is not None, distilled=model.dist_token is not None,
        fc_norm=isinstance(model.fc_norm, nn.LayerNorm), norm_eps=block.norm1.eps,
        dynamic_img_size=model.dynamic_img_size)
    if training:
        last = model.blocks[-1].drop_path1
        arch.update(drop_rate=model.pos_drop.p, attn_drop_rate=block.attn.attn_drop,
                    drop_path_rate=getattr(last, "drop_prob", 0.0))
    return arch


def _guess_heads(embed_dim: int) -> int:
    # Standard ViT/DeiT widths (Ti/S/B/L/H); otherwise head dimension 64, the papers' choice.
    known = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
    if embed_dim in known:
        return known[embed_dim]
    return embed_dim // 64 if embed_dim % 64 == 0 else 1


def infer_architecture(state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None,
                       name: str = "<state dict>") -> dict[str, Any]:
    """Constructor arguments from the shapes of a state dict in our layout; ``hints`` (from config files)
    supply what shapes cannot tell: number of heads, LayerNorm eps, a non-square grid, the pooling.

    Example:
        >>> sd = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).state_dict()
        >>> infer_architecture(sd, {"num_heads": 2})["depth"]
        2
    """
    hints = dict(hints or {})
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(f"{name}: no 4-D patch embedding (patch_embed.proj.weight); cannot infer the model")
    embed_dim, in_chans, patch_h, patch_w = weight.shape
    if patch_h != patch_w:
        raise CheckpointError(f"{name}: non-square patches {patch_h}x{patch_w} are not supported")
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))})
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None or fc1.ndim != 2:
        raise CheckpointError(f"{name}: no encoder blocks (blocks.0.mlp.fc1.weight) found")
    class_token, distilled = "cls_token" in state_dict, "dist_token" in state_dict
    prefix = int(class_token) + int(distilled)
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise CheckpointError(f"{name}: no (1, tokens, dim) position embedding (pos_embed)")
    num_patches = pos.shape[1] - prefix
    img_size = hints.get("img_size")
    grid = None
    if img_size is not None:
        size = img_size if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        if (size[0] // patch_h) * (size[1] // patch_w) == num_patches:
            grid = (size[0] // patch_h, size[1] // patch_w)
    if grid is None:
        side = math.isqrt(max(num_patches, 0))
        if side * side != num_patches or side == 0:
            raise CheckpointError(
                f"{name}: cannot tell the patch grid from {pos.shape[1]} position embeddings "
                f"({prefix} prefix tokens); pass model=VisionTransformer(img_size=(H, W), ...)")
        grid = (side, side)
    has_fc_norm = "fc_norm.weight" in state_dict
    global_pool = hints.get("global_pool") or ("avg" if has_fc_norm or not class_token else "token")
    head = state_dict.get("head.weight")
    return dict(
        img_size=grid[0] * patch_h if grid[0] == grid[1] else [grid[0] * patch_h, grid[1] * patch_w],
        patch_size=int(patch_h), in_chans=int(in_chans), num_classes=int(head.shape[0]) if head is not None else 0,
        embed_dim=int(embed_dim), depth=depth,
        num_heads=int(hints.get("num_heads") or _guess_heads(int(embed_dim))),
        mlp_ratio=fc1.shape[0] / embed_dim, qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        global_pool=global_pool, class_token=class_token, distilled=distilled,
        fc_norm=has_fc_norm if (has_fc_norm or "norm.weight" in state_dict) else None,
        norm_eps=float(hints.get("norm_eps", 1e-6)), dynamic_img_size=bool(hints.get("dynamic_img_size", False)))


def _grid(arch: Mapping[str, Any]) -> tuple[int, int]:
    size = arch["img_size"]
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return height // arch["patch_size"], width // arch["patch_size"]
