"""Hugging Face ``ViTForImageClassification`` / ``ViTModel`` / ``DeiTForImageClassification(WithTeacher)``
<-> our (timm) layout.

Files on the hub (and transformers' own ``save_pretrained``, also in v5) use the legacy names
(``vit.encoder.layer.N.attention.attention.query``); transformers 5 renames them in memory
(``vit.models.layers.N.attention.q_proj``). We read both and write the legacy names, which every transformers
version loads. HF keeps q, k and v apart; timm fuses them, in that order, into ``qkv``.
HF ViT uses LayerNorm eps 1e-12 (read from ``config.json``) and exact GELU (``hidden_act="gelu"``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ._common import HALF, IMAGENET_MEAN, IMAGENET_STD, CheckpointError, rename
from .hf_common import fuse_qkv

NAME = "hf"
SIGNATURE = r"(?:vit\.|deit\.)?embeddings\.patch_embeddings\.projection\.weight"
DEFAULTS: dict[str, Any] = {"mean": list(HALF), "std": list(HALF), "interpolation": "bilinear", "crop_pct": 1.0}
_DEIT_DEFAULTS = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                  "crop_pct": 224 / 256}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}

_LAYER = "encoder.layer.{i}."
RULES = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.distillation_token", "dist_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    (_LAYER + "layernorm_before.", "blocks.{i}.norm1."),
    (_LAYER + "layernorm_after.", "blocks.{i}.norm2."),
    (_LAYER + "attention.output.dense.", "blocks.{i}.attn.proj."),
    (_LAYER + "intermediate.dense.", "blocks.{i}.mlp.fc1."),
    (_LAYER + "output.dense.", "blocks.{i}.mlp.fc2."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
    ("cls_classifier.", "head."),
    ("distillation_classifier.", "head_dist."),
]
# transformers >= 5 in-memory names -> the legacy names used in files
_V5_RULES = [
    ("layers.{i}.attention.q_proj.", "encoder.layer.{i}.attention.attention.query."),
    ("layers.{i}.attention.k_proj.", "encoder.layer.{i}.attention.attention.key."),
    ("layers.{i}.attention.v_proj.", "encoder.layer.{i}.attention.attention.value."),
    ("layers.{i}.attention.o_proj.", "encoder.layer.{i}.attention.output.dense."),
    ("layers.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("layers.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("layers.{i}.", "encoder.layer.{i}."),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
# Weights of parts we do not model; dropped with the head (they only feed it) or never used for inference.
HEAD_EXTRAS = ("pooler.",)
UNUSED = ("embeddings.mask_token",)


def _strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^(vit|deit)\.", "", k): v for k, v in state_dict.items()}


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT/DeiT (legacy or transformers-5 names, with or without ``vit.``) -> ours.

    Example:
        >>> names = ("query", "key", "value")
        >>> sd = {f"vit.encoder.layer.0.attention.attention.{n}.weight": torch.eye(2) for n in names}
        >>> to_timm(sd)["blocks.0.attn.qkv.weight"].shape
        torch.Size([6, 2])
    """
    state_dict = rename(_strip_model_prefix(state_dict), _V5_RULES)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED)}
    fused = fuse_qkv(state_dict, _QKV.pattern, ("query", "key", "value"),
                     "encoder.layer.{i}.attention.attention.{part}.{kind}")
    return rename(fused, RULES)


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> Hugging Face file layout (``ViTForImageClassification``, or
    ``DeiTForImageClassificationWithTeacher`` for distilled models). See ``config`` for the matching config.

    Example:
        >>> sd = {"blocks.0.attn.qkv.weight": torch.zeros(6, 2), "head.weight": torch.zeros(3, 2)}
        >>> sorted(from_timm(sd, {"global_pool": "token", "class_token": True}))[0]
        'classifier.weight'
    """
    if architecture.get("global_pool", "token") != "token" or not architecture.get("class_token", True):
        raise CheckpointError("Hugging Face ViT classifies from the class token only; a model with "
                              "global_pool='avg' or class_token=False cannot be exported to it")
    if architecture.get("fc_norm"):
        raise CheckpointError("Hugging Face ViT has no fc_norm; this model cannot be exported to it")
    distilled = bool(architecture.get("distilled"))
    rules = [r for r in RULES if r[0] != ("classifier." if distilled else "cls_classifier.")]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        value = value.detach().clone()
        match = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if match:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{match.group(1)}.attention.attention.{name}.{match.group(2)}"] = part.clone()
        else:
            out[key] = value
    out = rename(out, rules, reverse=True)
    prefix = "deit." if distilled else "vit."
    heads = ("classifier.", "cls_classifier.", "distillation_classifier.")
    return {(k if k.startswith(heads) else prefix + k): v for k, v in out.items()}


def config(architecture: Mapping[str, Any], class_names: list[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict (for ``ViTConfig``/``DeiTConfig``) that goes with ``from_timm``'s state dict.

    Example:
        >>> config({"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8})["hidden_size"]
        64
    """
    img_size = architecture.get("img_size", 224)
    if isinstance(img_size, (list, tuple)):
        if img_size[0] != img_size[1]:
            raise CheckpointError(f"Hugging Face ViT needs square images, got img_size {list(img_size)}")
        img_size = img_size[0]
    distilled = bool(architecture.get("distilled"))
    num_classes = architecture.get("num_classes", 0)
    names = class_names or [f"LABEL_{i}" for i in range(num_classes)]
    return {
        "architectures": ["DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"],
        "model_type": "deit" if distilled else "vit",
        "hidden_size": architecture["embed_dim"],
        "num_hidden_layers": architecture["depth"],
        "num_attention_heads": architecture["num_heads"],
        "intermediate_size": int(architecture["embed_dim"] * architecture.get("mlp_ratio", 4.0)),
        "hidden_act": "gelu",
        "layer_norm_eps": architecture.get("norm_eps", 1e-6),
        "image_size": img_size,
        "patch_size": architecture["patch_size"],
        "num_channels": architecture.get("in_chans", 3),
        "qkv_bias": architecture.get("qkv_bias", True),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def read_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF ``config.json`` (+ ``preprocessor_config.json``) -> (architecture hints, preprocessing/labels).

    Example:
        >>> read_config({"num_attention_heads": 3, "layer_norm_eps": 1e-12})[0]
        {'num_heads': 3, 'norm_eps': 1e-12}
    """
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"Hugging Face config has hidden_act={act!r}; this model implements exact GELU "
                              "('gelu') only, so its outputs would differ")
    hints: dict[str, Any] = {}
    for ours, theirs in (("num_heads", "num_attention_heads"), ("norm_eps", "layer_norm_eps"),
                         ("img_size", "image_size"), ("qkv_bias", "qkv_bias")):
        if theirs in config:
            hints[ours] = config[theirs]
    meta: dict[str, Any] = dict(_DEIT_DEFAULTS) if config.get("model_type") == "deit" else {}
    labels = config.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else []
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholder names
        meta["class_names"] = names
    preprocessor = preprocessor or {}
    if preprocessor.get("image_mean") is not None:
        meta["mean"] = list(preprocessor["image_mean"])
    if preprocessor.get("image_std") is not None:
        meta["std"] = list(preprocessor["image_std"])
    if preprocessor.get("resample") in _PIL_RESAMPLE:
        meta["interpolation"] = _PIL_RESAMPLE[preprocessor["resample"]]
    return hints, meta
