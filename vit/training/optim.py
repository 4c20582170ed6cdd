"""Optimizer parameter groups and learning-rate schedules: pure functions, testable without a Trainer."""
from __future__ import annotations

import math
from typing import Any, Callable

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


class TimeBudgetCosine:
    """LR multiplier for a wall-clock budget: linear warm-up over the first ``warmup_steps()`` steps, then a cosine
    decay to ``min_lr_ratio`` over the *time* from the start to ``end()`` seconds, read from ``elapsed()``. The step
    rate is whatever the machine gives, so the schedule ends when the time does. Stateless in time (the clock
    comes back with a resumed run), which is why the decay is multiplied in rather than started after warm-up.

    Example:
        >>> clock = [0.0]
        >>> lr = TimeBudgetCosine(lambda: 2, 0.0, elapsed=lambda: clock[0], end=lambda: 100.0)
        >>> values = []
        >>> for step, t in ((0, 0.0), (2, 0.0), (5, 50.0), (9, 100.0)):
        ...     clock[0] = t
        ...     values.append(round(lr(step), 3))
        >>> values
        [0.333, 1.0, 0.5, 0.0]
    """

    def __init__(self, warmup_steps: Callable[[], int], min_lr_ratio: float, elapsed: Callable[[], float],
                 end: Callable[[], float]):
        self.warmup_steps, self.min_lr_ratio, self.elapsed, self.end = warmup_steps, min_lr_ratio, elapsed, end

    def __call__(self, step: int) -> float:
        warmup = self.warmup_steps()
        ramp = (step + 1) / (warmup + 1) if warmup > 0 and step < warmup else 1.0
        progress = min(max(self.elapsed() / max(self.end(), 1e-9), 0.0), 1.0)
        return ramp * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def scaled_param_groups(model: nn.Module, lr: float, weight_decay: float,
                        layer_decay: float | None = None) -> list[dict[str, Any]]:
    """``param_groups`` ready for an optimizer: each group's ``lr`` is ``lr`` x its layer-decay scale.

    Example:
        >>> from vit import VisionTransformer
        >>> model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
        >>> groups = scaled_param_groups(model, lr=0.1, weight_decay=0.05, layer_decay=0.5)
        >>> sorted({(round(g["lr"], 4), g["weight_decay"]) for g in groups})[-3:]
        [(0.05, 0.05), (0.1, 0.0), (0.1, 0.05)]
    """
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
        group.pop("names")
    return groups


def epoch_warmup_cosine(optimizer, trainer, warmup_epochs: float, min_lr_ratio: float):
    """Warm-up for ``warmup_epochs`` (at most half of training) then cosine to ``min_lr_ratio``, stepped per optimizer
    step over the ``trainer``'s estimated steps (``max_epochs`` -1 counts as one epoch)."""
    from torch.optim.lr_scheduler import LambdaLR
    total = max(1, int(trainer.estimated_stepping_batches))
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    warmup = min(int(round(warmup_epochs * total / max_epochs)), total // 2)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_lr_ratio))
