"""Pieces shared by the Hugging Face family maps (``hf_dinov2``, ``hf_clip``, ``hf_siglip``): q/k/v fusing and
splitting, activation names, the CLIP-style encoder layout (SigLIP's is a copy of CLIP's) and the preprocessing
recorded in ``preprocessor_config.json``. Not a format itself: nothing here is registered in ``FORMATS``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from ._common import CheckpointError

log = logging.getLogger(__name__)

# HF ``hidden_act`` -> our ``act_layer``. gelu_new / gelu_pytorch_tanh are the same tanh approximation.
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "silu": "silu", "swish": "silu"}
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}

# HF's CLIPEncoder (CLIP, SigLIP): encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp}
_LAYER = "encoder.layers.{i}."
ENCODER_RULES = [
    (_LAYER + "layer_norm1.", "blocks.{i}.norm1."),
    (_LAYER + "self_attn.out_proj.", "blocks.{i}.attn.proj."),
    (_LAYER + "layer_norm2.", "blocks.{i}.norm2."),
    (_LAYER + "mlp.fc1.", "blocks.{i}.mlp.fc1."),
    (_LAYER + "mlp.fc2.", "blocks.{i}.mlp.fc2."),
]
ENCODER_QKV = r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$"
ENCODER_QKV_NAME = "encoder.layers.{i}.self_attn.{part}_proj.{kind}"


def fuse_qkv(state_dict: Mapping[str, torch.Tensor], pattern: str, parts: tuple[str, str, str], name: str
             ) -> dict[str, torch.Tensor]:
    """Fuse separate q, k, v projections into ``blocks.N.attn.qkv``; ``pattern`` captures (block, part, kind)
    and ``name`` rebuilds a key from ``{i}``, ``{part}`` and ``{kind}``. Other keys pass through; an incomplete
    triple keeps its own names, so the key check lists it.

    Example:
        >>> sd = {f"l.0.{p}.weight": torch.eye(2) for p in "qkv"}
        >>> fuse_qkv(sd, r"^l\\.(\\d+)\\.(q|k|v)\\.(weight|bias)$", ("q", "k", "v"), "l.{i}.{part}.{kind}").keys()
        dict_keys(['blocks.0.attn.qkv.weight'])
    """
    regex = re.compile(pattern)
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = regex.match(key)
        if match:
            found.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        else:
            out[key] = value
    for (index, kind), qkv in found.items():
        if len(qkv) == 3:
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv[p] for p in parts])
        else:
            out.update({name.format(i=index, part=p, kind=kind): t for p, t in qkv.items()})
    return out


def split_qkv(state_dict: Mapping[str, torch.Tensor], parts: tuple[str, str, str], name: str
              ) -> dict[str, torch.Tensor]:
    """The inverse of ``fuse_qkv``: ``blocks.N.attn.qkv.*`` -> three keys named by ``name``.

    Example:
        >>> sorted(split_qkv({"blocks.1.attn.qkv.bias": torch.zeros(6)}, ("q", "k", "v"), "l.{i}.{part}.{kind}"))
        ['l.1.k.bias', 'l.1.q.bias', 'l.1.v.bias']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if match:
            for part, chunk in zip(parts, value.chunk(3, dim=0)):
                out[name.format(i=match.group(1), part=part, kind=match.group(2))] = chunk.clone()
        else:
            out[key] = value
    return out


def zero_qkv_bias(state_dict: dict[str, torch.Tensor], architecture: Mapping[str, Any]) -> None:
    """CLIP and SigLIP always have q/k/v biases: a model without them exports zeros (the same function)."""
    if architecture.get("qkv_bias", True):
        return
    for key in [k for k in state_dict if re.match(r"^blocks\.\d+\.attn\.qkv\.weight$", k)]:
        state_dict[key[:-len("weight")] + "bias"] = state_dict[key].new_zeros(state_dict[key].shape[0])


def ignore_text_tower(state_dict: Mapping[str, torch.Tensor], ignored: tuple[str, ...], family: str
                      ) -> dict[str, torch.Tensor]:
    """A full CLIP/SigLIP model's state dict less its text side (logged), and less the ``vision_model.`` prefix."""
    dropped = sorted({k.split(".")[0] for k in state_dict if k.startswith(ignored)})
    if dropped:
        log.info("Hugging Face %s: loading the vision tower only; ignored %d text-side tensors (%s)", family,
                 sum(k.startswith(ignored) for k in state_dict), ", ".join(dropped))
    return {k.removeprefix("vision_model."): v for k, v in state_dict.items() if not k.startswith(ignored)}


def act_layer(hidden_act: str, family: str) -> str:
    """HF ``hidden_act`` -> ``ViTConfig.act_layer``; an activation we do not implement raises."""
    if hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"Hugging Face {family} config has hidden_act={hidden_act!r}; this model implements "
                              f"{', '.join(sorted(ACTIVATIONS))} only, so its outputs would differ")
    return ACTIVATIONS[hidden_act]


def hidden_act(architecture: Mapping[str, Any]) -> str:
    return HF_ACTIVATIONS[architecture.get("act_layer", "gelu")]


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision tower's settings: ``vision_config`` of a full CLIP/SigLIP model, else the config itself."""
    return dict(config.get("vision_config") or config)


def hints_from(config: Mapping[str, Any], defaults: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Architecture hints from the keys every family shares; ``defaults`` are transformers' own defaults for
    the keys a config may leave out (activation, eps)."""
    values = {**defaults, **config}
    hints: dict[str, Any] = {}
    for ours, theirs in (("num_heads", "num_attention_heads"), ("norm_eps", "layer_norm_eps"),
                         ("img_size", "image_size"), ("qkv_bias", "qkv_bias")):
        if values.get(theirs) is not None:
            hints[ours] = values[theirs]
    if isinstance(hints.get("img_size"), (list, tuple)):
        hints["img_size"] = list(hints["img_size"])
    if values.get("hidden_act") is not None:
        hints["act_layer"] = act_layer(values["hidden_act"], family)
    return hints


def preprocessing(preprocessor: Mapping[str, Any] | None) -> dict[str, Any]:
    """mean, std, interpolation and crop_pct from a ``preprocessor_config.json`` (what is there of them).

    Example:
        >>> preprocessing({"image_mean": [0.5] * 3, "resample": 3, "size": {"shortest_edge": 256},
        ...                "do_center_crop": True, "crop_size": {"height": 224, "width": 224}})["crop_pct"]
        0.875
    """
    preprocessor = preprocessor or {}
    meta: dict[str, Any] = {}
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if isinstance(preprocessor.get(theirs), (list, tuple)):
            meta[ours] = [float(v) for v in preprocessor[theirs]]
    resample = preprocessor.get("resample")
    if resample in _PIL_RESAMPLE:
        meta["interpolation"] = _PIL_RESAMPLE[resample]
    elif isinstance(resample, str) and resample.lower() in _PIL_RESAMPLE.values():
        meta["interpolation"] = resample.lower()
    size, crop = preprocessor.get("size"), preprocessor.get("crop_size")
    if not preprocessor.get("do_center_crop", crop is not None):
        if size is not None:
            meta["crop_pct"] = 1.0  # resized straight to the input size (SigLIP)
    elif isinstance(size, Mapping) and size.get("shortest_edge"):
        crop_side = crop.get("height") if isinstance(crop, Mapping) else crop
        if isinstance(crop_side, (int, float)) and crop_side > 0:
            meta["crop_pct"] = round(crop_side / size["shortest_edge"], 4)
    return meta


def square_size(architecture: Mapping[str, Any], family: str) -> int:
    img_size = architecture.get("img_size", 224)
    if isinstance(img_size, (list, tuple)):
        if img_size[0] != img_size[1]:
            raise CheckpointError(f"Hugging Face {family} needs square images, got img_size {list(img_size)}")
        img_size = img_size[0]
    return int(img_size)


def refuse(family: str, problems: list[str]) -> None:
    """Raise one ``CheckpointError`` listing everything a model has that ``family`` cannot express."""
    if problems:
        raise CheckpointError(f"this model cannot be exported to Hugging Face {family}:\n  " + "\n  ".join(problems))
