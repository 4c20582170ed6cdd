"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` <-> our (timm) layout.

LayerScale ``layer_scale{1,2}.lambda1`` is ``blocks.N.ls{1,2}.gamma``; ``use_swiglu_ffn`` (giant) is our packed
SwiGLU (``weights_in`` = ``fc1``: gate half first, ``weights_out`` = ``fc2``, SiLU). HF adds position embeddings
to the class token and the patches, then inserts the register tokens without any; timm's reg4 models (and ours,
``no_embed_class``) keep the table for the patches only, so the class token's row is folded into ``cls_token``
(as timm's own DINOv2 conversion does). ``mask_token`` (masked-image pretraining only) is dropped. Files use the
legacy names (``attention.attention.query``, ``mlp.weights_in``); transformers 5 renames them in memory
(``attention.q_proj``, ``mlp.gate_proj``/``up_proj``); both are read, the legacy names written.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, rename
from .hf_common import fuse_qkv, hidden_act, hints_from, preprocessing, refuse, split_qkv, square_size

NAME = "hf_dinov2"
SIGNATURE = r"(?:dinov2\.|dinov2_with_registers\.)?encoder\.layer\.\d+\.layer_scale1\.lambda1"
# facebook/dinov2-*: resize to 256, centre crop 224, ImageNet statistics, bicubic
DEFAULTS: dict[str, Any] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                            "crop_pct": 0.875}
# transformers' Dinov2Config; no default activation: without a config the MLP's shape tells (SwiGLU: SiLU, else GELU)
_CONFIG_DEFAULTS = {"layer_norm_eps": 1e-6}

_LAYER = "encoder.layer.{i}."
RULES = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.register_tokens", "reg_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    (_LAYER + "norm1.", "blocks.{i}.norm1."),
    (_LAYER + "attention.output.dense.", "blocks.{i}.attn.proj."),
    (_LAYER + "layer_scale1.lambda1", "blocks.{i}.ls1.gamma"),
    (_LAYER + "norm2.", "blocks.{i}.norm2."),
    (_LAYER + "mlp.weights_in.", "blocks.{i}.mlp.fc1."),  # SwiGLU
    (_LAYER + "mlp.weights_out.", "blocks.{i}.mlp.fc2."),
    (_LAYER + "mlp.fc1.", "blocks.{i}.mlp.fc1."),  # plain MLP
    (_LAYER + "mlp.fc2.", "blocks.{i}.mlp.fc2."),
    (_LAYER + "layer_scale2.lambda1", "blocks.{i}.ls2.gamma"),
    ("layernorm.", "norm."),
]
_SWIGLU_RULES = ("mlp.weights_in.", "mlp.weights_out.")
# transformers >= 5 in-memory names -> the names used in files
_V5_RULES = [
    (_LAYER + "attention.q_proj.", _LAYER + "attention.attention.query."),
    (_LAYER + "attention.k_proj.", _LAYER + "attention.attention.key."),
    (_LAYER + "attention.v_proj.", _LAYER + "attention.attention.value."),
    (_LAYER + "attention.o_proj.", _LAYER + "attention.output.dense."),
    (_LAYER + "mlp.down_proj.", _LAYER + "mlp.weights_out."),
]
_QKV = r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"
_QKV_NAME = "encoder.layer.{i}.attention.attention.{part}.{kind}"
_PARTS = ("query", "key", "value")
UNUSED = ("embeddings.mask_token",)


def _pack_swiglu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's split ``gate_proj``/``up_proj`` -> the packed ``weights_in`` (gate first)."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"^(encoder\.layer\.\d+\.mlp\.)(gate|up)_proj\.(weight|bias)$", key)
        if not match:
            out[key] = value
        elif match.group(2) == "gate" and f"{match.group(1)}up_proj.{match.group(3)}" in state_dict:
            out[f"{match.group(1)}weights_in.{match.group(3)}"] = torch.cat(
                [value, state_dict[f"{match.group(1)}up_proj.{match.group(3)}"]])
        elif match.group(2) == "gate" or f"{match.group(1)}gate_proj.{match.group(3)}" not in state_dict:
            out[key] = value  # half a pair: left for the key check to report
    return out


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF DINOv2 (with or without registers, file or transformers-5 names) -> ours.

    Example:
        >>> sd = {"embeddings.cls_token": torch.zeros(1, 1, 2), "embeddings.register_tokens": torch.zeros(1, 4, 2),
        ...       "embeddings.position_embeddings": torch.ones(1, 5, 2)}
        >>> out = to_timm(sd); out["cls_token"][0, 0].tolist(), tuple(out["pos_embed"].shape)
        ([1.0, 1.0], (1, 4, 2))
    """
    state_dict = {re.sub(r"^(dinov2|dinov2_with_registers)\.", "", k): v for k, v in state_dict.items()}
    state_dict = _pack_swiglu(rename(state_dict, _V5_RULES))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED)}
    registers = state_dict.get("embeddings.register_tokens")
    if registers is not None and registers.ndim == 3 and registers.shape[1] == 0:
        del state_dict["embeddings.register_tokens"]  # num_register_tokens=0: a plain DINOv2
    out = rename(fuse_qkv(state_dict, _QKV, _PARTS, _QKV_NAME), RULES)
    pos, cls = out.get("pos_embed"), out.get("cls_token")
    if "reg_token" in out and pos is not None and cls is not None and pos.ndim == 3:
        # HF: the class token gets the table's first row, registers none -> no_embed_class with that row folded in
        out["cls_token"] = cls + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _hidden(architecture: Mapping[str, Any]) -> int:
    """The MLP's hidden width (``fc1``'s output), rounded as ``config.mlp_hidden`` rounds it."""
    return round(architecture["embed_dim"] * architecture.get("mlp_ratio", 4.0))


def _hf_mlp_ratio(architecture: Mapping[str, Any]) -> int | None:
    """The integer ``mlp_ratio`` (transformers 5 types it ``int``) that rebuilds our MLP: transformers makes
    ``int(D * ratio)`` hidden units, SwiGLU two halves of ``(int(D * ratio * 2/3) + 7) // 8 * 8``; None if none does."""
    embed_dim, hidden = architecture["embed_dim"], _hidden(architecture)
    swiglu = architecture.get("mlp_layer", "mlp") == "swiglu"
    for ratio in range(1, 65):
        width = int(embed_dim * ratio)
        if (2 * ((int(width * 2 / 3) + 7) // 8 * 8) if swiglu else width) == hidden:
            return ratio
    return None


def _problems(architecture: Mapping[str, Any]) -> list[str]:
    problems = []
    if not architecture.get("class_token", True):
        problems.append("class_token=False: DINOv2 always has a class token")
    if architecture.get("distilled"):
        problems.append("distilled=True: DINOv2 has no distillation token")
    if architecture.get("pre_norm"):
        problems.append("pre_norm=True: DINOv2 has no LayerNorm before the blocks")
    if architecture.get("global_pool", "token") != "token":
        problems.append(f"global_pool={architecture.get('global_pool')!r}: Dinov2Model pools the class token")
    if architecture.get("fc_norm") or not architecture.get("final_norm", True):
        problems.append("fc_norm / final_norm=False: Dinov2Model normalises every token with its final LayerNorm")
    if architecture.get("num_classes", 0):
        problems.append(f"num_classes={architecture['num_classes']}: Dinov2Model has no classifier, and "
                        "Dinov2ForImageClassification's reads the class token and the mean patch token together; "
                        "export the backbone (a copy with model.reset_classifier(0))")
    swiglu = architecture.get("mlp_layer", "mlp") == "swiglu"
    if swiglu and architecture.get("act_layer", "silu") != "silu":
        problems.append(f"act_layer={architecture.get('act_layer')!r}: DINOv2's SwiGLU gates with SiLU")
    if _hf_mlp_ratio(architecture) is None:
        problems.append(f"{'SwiGLU' if swiglu else 'MLP'} width {_hidden(architecture)} for embed_dim "
                        f"{architecture['embed_dim']}: no integer mlp_ratio of transformers' Dinov2Config gives it"
                        + (" (it rounds each SwiGLU half to a multiple of 8)" if swiglu else ""))
    return problems


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> HF ``Dinov2Model`` (``Dinov2WithRegistersModel`` with register tokens) file layout; ``config``
    writes the matching config.json. Position rows of prefix tokens are folded back exactly: the class token's
    into the table's first row (zero when ``no_embed_class``), the registers' into the register tokens.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0,
        ...                       init_values=1e-5, reg_tokens=2, no_embed_class=True)
        >>> sd = from_timm(m.state_dict(), m.config.to_dict())
        >>> tuple(sd["embeddings.position_embeddings"].shape), "encoder.layer.0.layer_scale1.lambda1" in sd
        ((1, 5, 16), True)
    """
    refuse("Dinov2Model", _problems(architecture))
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    registers = int(architecture.get("reg_tokens", 0))
    pos = sd["pos_embed"]
    if architecture.get("no_embed_class"):
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    else:
        if registers:  # a constant added to a constant token: fold it in
            sd["reg_token"] = sd["reg_token"] + pos[:, 1:1 + registers]
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, 1 + registers:]], dim=1)
    for index in sorted({m.group(1) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}):
        for name in ("ls1", "ls2"):  # no LayerScale is LayerScale by one
            sd.setdefault(f"blocks.{index}.{name}.gamma", torch.ones_like(sd[f"blocks.{index}.norm1.weight"]))
    swiglu = architecture.get("mlp_layer", "mlp") == "swiglu"
    rules = [r for r in RULES if r[0].endswith(_SWIGLU_RULES) == swiglu or "mlp." not in r[0]]
    out = rename(split_qkv(sd, _PARTS, _QKV_NAME), rules, reverse=True)
    out["embeddings.mask_token"] = pos.new_zeros(1, pos.shape[-1])  # unused at inference; present in the model
    return out


def config(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict (``Dinov2Config`` / ``Dinov2WithRegistersConfig``) for ``from_timm``'s weights.

    Example:
        >>> config({"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8})["model_type"]
        'dinov2'
    """
    embed_dim, registers = architecture["embed_dim"], int(architecture.get("reg_tokens", 0))
    swiglu = architecture.get("mlp_layer", "mlp") == "swiglu"
    out = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": embed_dim,
        "num_hidden_layers": architecture["depth"],
        "num_attention_heads": architecture["num_heads"],
        "mlp_ratio": _hf_mlp_ratio(architecture),
        "hidden_act": "silu" if swiglu else hidden_act(architecture),
        "use_swiglu_ffn": swiglu,
        "layer_norm_eps": architecture.get("norm_eps", 1e-6),
        "layerscale_value": architecture.get("init_values") or 1.0,
        "image_size": square_size(architecture, "DINOv2"),
        "patch_size": architecture["patch_size"],
        "num_channels": architecture.get("in_chans", 3),
        "qkv_bias": architecture.get("qkv_bias", True),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "use_mask_token": True,
    }
    if registers:
        out["num_register_tokens"] = registers
    return out


def read_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF DINOv2 ``config.json`` (+ ``preprocessor_config.json``) -> (architecture hints, preprocessing).

    Example:
        >>> read_config({"num_attention_heads": 6, "use_swiglu_ffn": True, "layerscale_value": 1e-5})[0]
        {'num_heads': 6, 'norm_eps': 1e-06, 'act_layer': 'silu', 'init_values': 1e-05}
    """
    hints = hints_from(config, _CONFIG_DEFAULTS, "DINOv2")
    if config.get("use_swiglu_ffn"):
        hints["act_layer"] = "silu"  # the SwiGLU ignores hidden_act
    if config.get("layerscale_value"):
        hints["init_values"] = float(config["layerscale_value"])
    if config.get("model_type") == "dinov2_with_registers" or "num_register_tokens" in config:
        # our layout for registers: the table covers the patches only (the class token's row folded in)
        hints["no_embed_class"] = bool(config.get("num_register_tokens", 4))
    elif config.get("model_type") == "dinov2":
        hints["no_embed_class"] = False
    return hints, preprocessing(preprocessor)
