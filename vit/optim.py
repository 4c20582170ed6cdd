"""Optimizer parameter groups and learning-rate schedules: pure functions, testable without a Trainer."""
from __future__ import annotations

import math
from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay for ``model.no_weight_decay()`` names, and with
    ``layer_decay`` one group per depth whose ``lr_scale`` is ``layer_decay ** (max_depth - depth)``
    (BEiT / timm layer-wise LR decay: embeddings deepest, head at full LR). Frozen parameters are left out.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
        >>> sorted(g["weight_decay"] for g in param_groups(m, 0.05))
        [0.0, 0.05]
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    depth_of = model.layer_ids() if layer_decay is not None else {}
    max_depth = max(depth_of.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = name in skip
        depth = depth_of.get(name, 0)
        key = (depth, no_decay)
        if key not in groups:
            scale = layer_decay ** (max_depth - depth) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale, "layer_id": depth}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    Example:
        >>> [round(warmup_cosine(s, 2, 10), 3) for s in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
