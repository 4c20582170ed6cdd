"""torchvision's ``VisionTransformer`` (``vit_b_16`` & co.) <-> our (timm) layout.

torchvision keeps attention in ``nn.MultiheadAttention`` whose ``in_proj_weight`` is q, k, v stacked in the
same order and head split as timm's fused ``qkv``, so the map is a pure renaming. It always has a class
token, token pooling and qkv biases; its weights expect ImageNet mean/std and bilinear resizing.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, rename

NAME = "torchvision"
SIGNATURE = r"conv_proj\.weight"
DEFAULTS: dict[str, Any] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear",
                            "crop_pct": 224 / 256}

_LAYER = "encoder.layers.encoder_layer_{i}."
RULES = [
    ("class_token", "cls_token"),
    ("conv_proj.", "patch_embed.proj."),
    ("encoder.pos_embedding", "pos_embed"),
    (_LAYER + "ln_1.", "blocks.{i}.norm1."),
    (_LAYER + "self_attention.in_proj_weight", "blocks.{i}.attn.qkv.weight"),
    (_LAYER + "self_attention.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
    (_LAYER + "self_attention.out_proj.", "blocks.{i}.attn.proj."),
    (_LAYER + "ln_2.", "blocks.{i}.norm2."),
    (_LAYER + "mlp.0.", "blocks.{i}.mlp.fc1."),
    (_LAYER + "mlp.3.", "blocks.{i}.mlp.fc2."),
    (_LAYER + "mlp.linear_1.", "blocks.{i}.mlp.fc1."),  # torchvision < 0.13 names, still in old files
    (_LAYER + "mlp.linear_2.", "blocks.{i}.mlp.fc2."),
    ("encoder.ln.", "norm."),
    ("heads.head.", "head."),
]
EXPORT_RULES = [rule for rule in RULES if "linear_" not in rule[0]]


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision -> ours. ``heads.pre_logits`` (the optional representation layer) has no counterpart
    and stays as an unexpected key.

    Example:
        >>> to_timm({"encoder.layers.encoder_layer_0.ln_1.weight": torch.ones(8)}).keys()
        dict_keys(['blocks.0.norm1.weight'])
    """
    return rename(state_dict, RULES)


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> torchvision, loadable by ``torchvision.models.vision_transformer.VisionTransformer``.

    A model without qkv biases gets zero ``in_proj_bias`` (the same function); average pooling, no class
    token or a distillation token have no torchvision equivalent and raise ``CheckpointError``.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> sorted(from_timm(m.state_dict(), {"global_pool": "token", "class_token": True}))[0]
        'class_token'
    """
    if architecture.get("global_pool", "token") != "token" or not architecture.get("class_token", True):
        raise CheckpointError("torchvision's VisionTransformer pools the class token only; "
                              "a model with global_pool='avg' or class_token=False cannot be exported to it")
    if architecture.get("distilled") or architecture.get("fc_norm"):
        raise CheckpointError("torchvision's VisionTransformer has no distillation token and no fc_norm")
    state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    for key in [k for k in state_dict if k.endswith(".attn.qkv.weight")]:
        bias_key = key[:-len("weight")] + "bias"
        if bias_key not in state_dict:
            state_dict[bias_key] = torch.zeros(state_dict[key].shape[0], dtype=state_dict[key].dtype)
    return rename(state_dict, EXPORT_RULES, reverse=True)


def read_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """torchvision writes no config file; nothing to read.

    Example:
        >>> read_config({})
        ({}, {})
    """
    return {}, {}
