"""Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` <-> our (timm) layout.

CLIP normalises after the position embedding (``pre_layrnorm``, sic: ``norm_pre``, with no patch-embedding bias)
and normalises only the pooled class token (``post_layernorm``); our ``norm`` normalises every token, so our
``forward_features`` equals HF's ``post_layernorm(last_hidden_state)``. ``visual_projection`` (no bias) becomes
``head`` with a zero bias: ``model(x)`` is HF's ``image_embeds``. Of a full ``CLIPModel`` only the vision tower
and the projection are loaded; the text tower and ``logit_scale`` are ignored (logged). transformers writes
``CLIPVisionModel`` without the ``vision_model.`` prefix and the others with it: both are read, the prefix is
written (what the hub's files have, and every transformers version loads).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._common import rename
from .hf_common import (ENCODER_QKV, ENCODER_QKV_NAME, ENCODER_RULES, fuse_qkv, hidden_act, hints_from,
                        ignore_text_tower, preprocessing, refuse, split_qkv, square_size, vision_config, zero_qkv_bias)

NAME = "hf_clip"
SIGNATURE = r"(?:vision_model\.)?embeddings\.class_embedding"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# openai/clip-vit-*: resize the short side to the input size, centre crop it (nothing cut beyond the aspect), bicubic
DEFAULTS: dict[str, Any] = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                            "crop_pct": 1.0}
_CONFIG_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}  # transformers' CLIPVisionConfig

RULES = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("pre_layrnorm.", "norm_pre."),
    *ENCODER_RULES,
    ("post_layernorm.", "norm."),
    ("visual_projection.weight", "head.weight"),
]
IGNORED = ("text_model.", "text_projection.", "logit_scale")  # a full CLIPModel's text side
UNUSED = ("embeddings.position_ids",)  # a buffer older transformers saved
_PARTS = ("q", "k", "v")


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision tower (+ ``visual_projection``), alone or inside a full ``CLIPModel`` -> ours.

    Example:
        >>> sd = {"vision_model.embeddings.class_embedding": torch.zeros(8), "logit_scale": torch.zeros(()),
        ...       "visual_projection.weight": torch.zeros(4, 8), "text_projection.weight": torch.zeros(4, 8)}
        >>> {k: tuple(v.shape) for k, v in to_timm(sd).items()}
        {'cls_token': (1, 1, 8), 'head.weight': (4, 8), 'head.bias': (4,)}
    """
    state_dict = ignore_text_tower(state_dict, IGNORED, "CLIPModel")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED)}
    out = rename(fuse_qkv(state_dict, ENCODER_QKV, _PARTS, ENCODER_QKV_NAME), RULES)
    if out.get("cls_token") is not None and out["cls_token"].ndim == 1:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if out.get("pos_embed") is not None and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    if out.get("head.weight") is not None and "head.bias" not in out:
        out["head.bias"] = out["head.weight"].new_zeros(out["head.weight"].shape[0])  # the projection has none
    return out


def _problems(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, says in (("distilled", "a distillation token"), ("init_values", "LayerScale"),
                      ("reg_tokens", "register tokens")):
        if architecture.get(key):
            problems.append(f"{key}={architecture[key]!r}: CLIP has no {says}")
    if not architecture.get("class_token", True) or architecture.get("global_pool", "token") != "token":
        problems.append("CLIP pools its class token (class_token=True, global_pool='token')")
    if not architecture.get("pre_norm"):
        problems.append("pre_norm=False: CLIP always normalises before the blocks (pre_layrnorm)")
    if architecture.get("fc_norm") or not architecture.get("final_norm", True):
        problems.append("fc_norm / final_norm=False: CLIP's post_layernorm is a final norm on the class token")
    if architecture.get("mlp_layer", "mlp") != "mlp":
        problems.append(f"mlp_layer={architecture['mlp_layer']!r}: CLIP's MLP is fc1 -> activation -> fc2")
    bias = state_dict.get("head.bias")
    if bias is not None and bias.abs().max() > 0:
        problems.append("head.bias is not zero: CLIP's visual_projection has no bias")
    return problems


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> HF ``CLIPVisionModelWithProjection`` file layout (``CLIPVisionModel`` without a head); ``config``
    writes the matching config.json.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0,
        ...                       pre_norm=True, act_layer="quick_gelu")
        >>> sorted(from_timm(m.state_dict(), m.config.to_dict()))[:2]
        ['vision_model.embeddings.class_embedding', 'vision_model.embeddings.patch_embedding.weight']
    """
    refuse("CLIPVisionModelWithProjection", _problems(state_dict, architecture))
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    sd.pop("head.bias", None)
    if architecture.get("no_embed_class"):  # the class token's position row is then zero
        sd["pos_embed"] = torch.cat([sd["pos_embed"].new_zeros(1, 1, sd["pos_embed"].shape[-1]), sd["pos_embed"]], 1)
    sd["cls_token"] = sd["cls_token"].reshape(-1)
    sd["pos_embed"] = sd["pos_embed"][0]
    zero_qkv_bias(sd, architecture)
    out = rename(split_qkv(sd, _PARTS, ENCODER_QKV_NAME), RULES, reverse=True)
    return {(k if k.startswith("visual_projection.") else "vision_model." + k): v for k, v in out.items()}


def config(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict (``CLIPVisionConfig``) for ``from_timm``'s weights.

    Example:
        >>> config({"embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 32})["architectures"]
        ['CLIPVisionModelWithProjection']
    """
    num_classes = architecture.get("num_classes", 0)
    return {
        "architectures": ["CLIPVisionModelWithProjection" if num_classes else "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": architecture["embed_dim"],
        "intermediate_size": round(architecture["embed_dim"] * architecture.get("mlp_ratio", 4.0)),
        "num_hidden_layers": architecture["depth"],
        "num_attention_heads": architecture["num_heads"],
        "hidden_act": hidden_act(architecture),
        "layer_norm_eps": architecture.get("norm_eps", 1e-5),
        "image_size": square_size(architecture, "CLIP"),
        "patch_size": architecture.get("patch_size", 16),
        "num_channels": architecture.get("in_chans", 3),
        "projection_dim": num_classes or 512,  # transformers' default when there is no projection
        "attention_dropout": 0.0,
    }


def read_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF CLIP ``config.json`` (a vision config, or a full model's with ``vision_config``) + preprocessor ->
    (architecture hints, preprocessing). The projection's width comes from ``visual_projection`` itself.

    Example:
        >>> read_config({"vision_config": {"num_attention_heads": 12, "image_size": 336}, "projection_dim": 768})[0]
        {'num_heads': 12, 'norm_eps': 1e-05, 'img_size': 336, 'act_layer': 'quick_gelu'}
    """
    return hints_from(vision_config(config), _CONFIG_DEFAULTS, "CLIP"), preprocessing(preprocessor)
