"""Hugging Face ``SiglipVisionModel`` / ``SiglipModel`` <-> our (timm) layout.

SigLIP has no class token, position embeddings for the patches only, ``post_layernorm`` over every token (our
``norm``) and attention pooling (``SiglipMultiheadAttentionPoolingHead`` -> ``attn_pool``: ``probe`` is the
``latent``, ``nn.MultiheadAttention``'s packed ``in_proj`` splits into ``q`` and ``kv``, ``out_proj`` is ``proj``,
``layernorm`` is ``norm``). ``hidden_act="gelu_pytorch_tanh"`` is ``act_layer="gelu_tanh"``. Of a full
``SiglipModel`` only the vision tower is loaded; the text tower, ``logit_scale`` and ``logit_bias`` are ignored
(logged). The encoder is HF's CLIP encoder layout (``hf_common.ENCODER_RULES``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ._common import HALF, rename
from .hf_common import (ENCODER_QKV, ENCODER_QKV_NAME, ENCODER_RULES, fuse_qkv, hidden_act, hints_from,
                        ignore_text_tower, preprocessing, refuse, split_qkv, square_size, vision_config, zero_qkv_bias)

NAME = "hf_siglip"
# CLIP has no patch-embedding bias: this key tells SigLIP apart whether or not its pooling head is there
SIGNATURE = r"(?:vision_model\.)?embeddings\.patch_embedding\.bias"
# google/siglip-*: resized straight to the input size, bicubic, scaled to [-1, 1]
DEFAULTS: dict[str, Any] = {"mean": list(HALF), "std": list(HALF), "interpolation": "bicubic", "crop_pct": 1.0}
_CONFIG_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # transformers' SiglipVisionConfig

RULES = [
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    *ENCODER_RULES,
    ("post_layernorm.", "norm."),
    ("head.probe", "attn_pool.latent"),
    ("head.attention.out_proj.", "attn_pool.proj."),
    ("head.layernorm.", "attn_pool.norm."),
    ("head.mlp.", "attn_pool.mlp."),
]
IGNORED = ("text_model.", "logit_scale", "logit_bias")  # a full SiglipModel's text side
UNUSED = ("embeddings.position_ids",)
_PARTS = ("q", "k", "v")


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SigLIP vision tower, alone or inside a full ``SiglipModel`` -> ours.

    Example:
        >>> sd = {"vision_model.head.attention.in_proj_weight": torch.zeros(24, 8), "logit_bias": torch.zeros(1)}
        >>> {k: tuple(v.shape) for k, v in to_timm(sd).items()}
        {'attn_pool.q.weight': (8, 8), 'attn_pool.kv.weight': (16, 8)}
    """
    state_dict = ignore_text_tower(state_dict, IGNORED, "SiglipModel")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"^head\.attention\.in_proj_(weight|bias)$", key)
        if match:  # nn.MultiheadAttention packs q, k, v; the latent's query is separate from the tokens' k, v
            width = value.shape[0] // 3
            out[f"attn_pool.q.{match.group(1)}"], out[f"attn_pool.kv.{match.group(1)}"] = value[:width], value[width:]
        elif not key.startswith(UNUSED):
            out[key] = value
    out = rename(fuse_qkv(out, ENCODER_QKV, _PARTS, ENCODER_QKV_NAME), RULES)
    if out.get("pos_embed") is not None and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return out


def _problems(architecture: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, says in (("class_token", "a class token"), ("distilled", "a distillation token"),
                      ("reg_tokens", "register tokens"), ("init_values", "LayerScale"),
                      ("pre_norm", "LayerNorm before the blocks")):
        if architecture.get(key, key == "class_token"):
            problems.append(f"{key}={architecture.get(key, True)!r}: SigLIP has no {says}")
    if architecture.get("global_pool", "token") != "map":
        problems.append(f"global_pool={architecture.get('global_pool', 'token')!r}: SiglipVisionModel pools with "
                        "its attention head (global_pool='map')")
    if architecture.get("fc_norm") or not architecture.get("final_norm", True):
        problems.append("fc_norm / final_norm=False: SigLIP normalises every token (post_layernorm) before pooling")
    if architecture.get("mlp_layer", "mlp") != "mlp":
        problems.append(f"mlp_layer={architecture['mlp_layer']!r}: SigLIP's MLP is fc1 -> activation -> fc2")
    if architecture.get("num_classes", 0):
        problems.append(f"num_classes={architecture['num_classes']}: SiglipVisionModel has no classifier (and "
                        "SiglipForImageClassification's averages the patch tokens); export the backbone "
                        "(a copy with model.reset_classifier(0))")
    return problems


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> HF ``SiglipVisionModel`` file layout; ``config`` writes the matching config.json.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0,
        ...                       class_token=False, global_pool="map", act_layer="gelu_tanh")
        >>> tuple(from_timm(m.state_dict(), m.config.to_dict())["vision_model.head.attention.in_proj_weight"].shape)
        (48, 16)
    """
    refuse("SiglipVisionModel", _problems(architecture))
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    sd["pos_embed"] = sd["pos_embed"][0]
    zero_qkv_bias(sd, architecture)
    out = rename(split_qkv(sd, _PARTS, ENCODER_QKV_NAME), RULES, reverse=True)
    q_weight, kv_weight = out.pop("attn_pool.q.weight"), out.pop("attn_pool.kv.weight")
    out["head.attention.in_proj_weight"] = torch.cat([q_weight, kv_weight])
    q_bias, kv_bias = out.pop("attn_pool.q.bias", None), out.pop("attn_pool.kv.bias", None)
    out["head.attention.in_proj_bias"] = torch.cat([  # nn.MultiheadAttention always has the bias
        q_bias if q_bias is not None else q_weight.new_zeros(q_weight.shape[0]),
        kv_bias if kv_bias is not None else kv_weight.new_zeros(kv_weight.shape[0])])
    return {"vision_model." + k: v for k, v in out.items()}


def config(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict (``SiglipVisionConfig``) for ``from_timm``'s weights.

    Example:
        >>> config({"embed_dim": 64, "depth": 2, "num_heads": 2, "act_layer": "gelu_tanh"})["hidden_act"]
        'gelu_pytorch_tanh'
    """
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": architecture["embed_dim"],
        "intermediate_size": round(architecture["embed_dim"] * architecture.get("mlp_ratio", 4.0)),
        "num_hidden_layers": architecture["depth"],
        "num_attention_heads": architecture["num_heads"],
        "hidden_act": hidden_act(architecture),
        "layer_norm_eps": architecture.get("norm_eps", 1e-6),
        "image_size": square_size(architecture, "SigLIP"),
        "patch_size": architecture.get("patch_size", 16),
        "num_channels": architecture.get("in_chans", 3),
        "vision_use_head": True,
        "attention_dropout": 0.0,
    }


def read_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF SigLIP ``config.json`` (a vision config, or a full model's with ``vision_config``) + preprocessor ->
    (architecture hints, preprocessing).

    Example:
        >>> read_config({"vision_config": {"num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh"}})[0]
        {'num_heads': 16, 'norm_eps': 1e-06, 'act_layer': 'gelu_tanh'}
    """
    return hints_from(vision_config(config), _CONFIG_DEFAULTS, "SigLIP"), preprocessing(preprocessor)
