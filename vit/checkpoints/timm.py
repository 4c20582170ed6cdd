"""timm (and DeiT, which uses timm's layout): our parameter names are timm's, so the maps are the identity.

What a timm state dict cannot tell (number of heads, image size for non-square grids, pooling) comes from
the ``config.json`` that timm writes next to hub weights (``architecture``, ``model_args``,
``pretrained_cfg``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..models.config import TRAINING_FIELDS, field_names
from ..models.registry import MODELS

NAME = "timm"
SIGNATURE = r"patch_embed\.proj\.weight"
# Preprocessing a bare timm state dict implies nothing about; DeiT (distilled) weights use ImageNet's.
DEFAULTS: dict[str, Any] = {"mean": None, "std": None, "interpolation": "bicubic", "crop_pct": 0.9}


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm -> timm (our layout): a copy.

    Example:
        >>> to_timm({"cls_token": torch.zeros(1, 1, 8)}).keys()
        dict_keys(['cls_token'])
    """
    return dict(state_dict)


def from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> timm: detached copies, loadable by ``timm.create_model(...).load_state_dict``.

    Example:
        >>> from_timm({"cls_token": torch.zeros(1, 1, 8)})["cls_token"].shape
        torch.Size([1, 1, 8])
    """
    return {k: v.detach().clone() for k, v in state_dict.items()}


def read_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """timm's hub ``config.json`` -> (architecture hints, preprocessing/labels).

    Example:
        >>> read_config({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": [0.5] * 3}})[1]["mean"]
        [0.5, 0.5, 0.5]
    """
    hints: dict[str, Any] = {}
    architecture = config.get("architecture")
    if isinstance(architecture, str):
        registered = MODELS.get(architecture.split(".")[0])
        if registered is not None:
            hints.update(registered.to_dict(training=False))
    model_args = config.get("model_args") or {}
    hints.update({k: model_args[k] for k in field_names() if k in model_args and k not in TRAINING_FIELDS})
    if config.get("global_pool") in ("token", "avg"):
        hints["global_pool"] = config["global_pool"]
    cfg = config.get("pretrained_cfg") or {}
    meta = {k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if cfg.get(k) is not None}
    if "input_size" in cfg and "img_size" not in hints:
        hints["img_size"] = list(cfg["input_size"][-2:])
    if cfg.get("label_names"):
        meta["class_names"] = list(cfg["label_names"])
    return hints, meta
