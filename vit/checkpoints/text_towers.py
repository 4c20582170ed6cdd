"""CLIP / SigLIP text towers <-> our ``TextTransformer`` layout, one pure map per source, both ways.

Ours: ``token_embedding.weight`` (V, D), ``pos_embed`` (1, L, D), ``blocks.N.*`` (the image model's names),
``norm``, ``text_projection.weight`` (E, D) [+ ``.bias``]; the pair's ``logit_scale`` / ``logit_bias`` beside.

- OpenAI CLIP / OpenCLIP (``CLIP``: text keys at the root; ``CustomTextCLIP``: under ``text.``):
  ``positional_embedding`` (L, D), ``transformer.resblocks.N`` (``nn.MultiheadAttention``, as the image tower),
  ``ln_final``, ``text_projection`` (D, E) used as ``x @ proj`` — or an ``nn.Linear`` with ``proj_bias``.
- Hugging Face ``CLIPModel`` / ``SiglipModel``: ``text_model.embeddings.{token,position}_embedding``, the CLIP encoder
  layout, ``text_model.final_layer_norm``; CLIP's ``text_projection`` (no bias) at the root, SigLIP's
  ``text_model.head`` (with bias).
- big_vision SigLIP ``.npz``: ``params/txt/Embed_0/embedding``, ``params/txt/pos_embedding``, an ``Encoder_0``
  laid out as the image encoder (``encoderblock_N`` or scanned), ``encoder_norm``, ``head``; ``params/t`` (log
  temperature) and ``params/b`` (bias).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from . import npz, openclip
from ._common import CheckpointError, block_indices, rename
from .hf_common import ENCODER_QKV, ENCODER_QKV_NAME, ENCODER_RULES, fuse_qkv, split_qkv

# format -> a key only that format's text tower has (after wrapper prefixes are removed)
TEXT_SIGNATURES = {
    "hf_siglip": r"text_model\.head\.weight",
    "hf_clip": r"text_model\.embeddings\.token_embedding\.weight",
    "openclip": r"(?:text\.)?token_embedding\.weight",
    "npz": r"params/txt/Embed_0/embedding",
}
LOGIT_KEYS = ("logit_scale", "logit_bias")
_HF_RULES = [
    ("embeddings.token_embedding.", "token_embedding."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    *ENCODER_RULES,
    ("final_layer_norm.", "norm."),
    ("head.", "text_projection."),
]
_HF_PARTS = ("q", "k", "v")


def text_format(state_dict: Mapping[str, Any]) -> str | None:
    """Which text tower layout the keys hold, or None.

    Example:
        >>> text_format({"text_model.head.weight": 0, "text_model.embeddings.token_embedding.weight": 0})
        'hf_siglip'
    """
    for name, signature in TEXT_SIGNATURES.items():
        pattern = re.compile("^" + signature + "$")
        if any(pattern.match(k) for k in state_dict):
            return name
    return None


def _tensor_3d(value: torch.Tensor) -> torch.Tensor:
    return value.unsqueeze(0) if value.ndim == 2 else value


# ---- to ours -------------------------------------------------------------------------------------------------
def openclip_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text side of an OpenAI CLIP / OpenCLIP state dict (image tower and ``logit_*`` left out) -> ours.

    Example:
        >>> sd = {"token_embedding.weight": torch.zeros(10, 8), "positional_embedding": torch.zeros(4, 8),
        ...       "text_projection": torch.zeros(8, 6), "visual.proj": torch.zeros(8, 6)}
        >>> {k: tuple(v.shape) for k, v in openclip_to_ours(sd).items()}
        {'token_embedding.weight': (10, 8), 'pos_embed': (1, 4, 8), 'text_projection.weight': (6, 8)}
    """
    custom = any(k.startswith("text.") for k in state_dict)
    tower = {(k[len("text."):] if custom else k): v for k, v in state_dict.items()
             if (k.startswith("text.") if custom else not k.startswith("visual."))
             and k not in LOGIT_KEYS and k not in openclip.OPENAI_JIT_KEYS and k != "attn_mask"}
    out = rename({k: v for k, v in tower.items() if not k.startswith("ln_final.")}, openclip.RULES)
    out.update({"norm." + k[len("ln_final."):]: v for k, v in tower.items() if k.startswith("ln_final.")})
    if "positional_embedding" in out:
        out["pos_embed"] = _tensor_3d(out.pop("positional_embedding"))
    proj = out.get("text_projection")
    if isinstance(proj, torch.Tensor):  # a bare parameter (D, E), applied as x @ proj
        out["text_projection.weight"] = out.pop("text_projection").t().contiguous()
    return out


def hf_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text side of a Hugging Face ``CLIPModel`` / ``SiglipModel`` state dict -> ours.

    Example:
        >>> sd = {"text_model.final_layer_norm.weight": torch.ones(8), "text_projection.weight": torch.zeros(6, 8),
        ...       "vision_model.post_layernorm.weight": torch.ones(8)}
        >>> sorted(hf_to_ours(sd))
        ['norm.weight', 'text_projection.weight']
    """
    tower = {k[len("text_model."):]: v for k, v in state_dict.items()
             if k.startswith("text_model.") and not k.endswith("position_ids")}
    out = rename(fuse_qkv(tower, ENCODER_QKV, _HF_PARTS, ENCODER_QKV_NAME), _HF_RULES)
    if "text_projection.weight" in state_dict:
        out["text_projection.weight"] = state_dict["text_projection.weight"]
    if "pos_embed" in out:
        out["pos_embed"] = _tensor_3d(out["pos_embed"])
    return out


def npz_to_ours(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """big_vision's ``params/txt/`` arrays -> ours (the encoder read by the image ``npz`` map).

    Example:
        >>> sd = {"params/txt/Embed_0/embedding": torch.zeros(10, 8), "params/txt/pos_embedding": torch.zeros(1, 4, 8)}
        >>> {k: tuple(v.shape) for k, v in npz_to_ours(sd).items()}
        {'pos_embed': (1, 4, 8), 'token_embedding.weight': (10, 8)}
    """
    prefix = "params/txt/"
    tower = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    embedding = tower.pop("Embed_0/embedding", None)
    encoder = {("Transformer/" + k[len("Encoder_0/"):] if k.startswith("Encoder_0/") else k): v
               for k, v in tower.items()}
    out = npz.to_timm(encoder)
    if embedding is not None:
        out["token_embedding.weight"] = embedding
    for part in ("weight", "bias"):
        if f"head.{part}" in out:
            out[f"text_projection.{part}"] = out.pop(f"head.{part}")
    return out


def npz_logits(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """big_vision's ``params/t`` (log temperature) and ``params/b`` -> ``logit_scale`` / ``logit_bias``."""
    found = {}
    for key, ours in (("params/t", "logit_scale"), ("params/b", "logit_bias")):
        if key in arrays:
            found[ours] = arrays[key].reshape(())
    return found


def npz_num_heads(arrays: Mapping[str, torch.Tensor]) -> int | None:
    """The text encoder's heads, from its query kernel (D, heads, D/heads)."""
    return npz.num_heads({k: v for k, v in arrays.items() if k.startswith("params/txt/")})


# ---- the architecture ------------------------------------------------------------------------------------------
def infer_text_config(state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``TextConfig`` fields from our-layout tensors' shapes, then ``hints`` (config files, the caller) on top.
    The heads are not in the shapes: without a hint, OpenAI's rule (width / 64) is used."""
    try:
        vocab_size, embed_dim = state_dict["token_embedding.weight"].shape
        context_length = state_dict["pos_embed"].shape[1]
    except KeyError as error:
        raise CheckpointError(f"{name}: the text tower has no {error.args[0]} (token embedding and position table "
                              f"are needed)") from None
    depth = len(block_indices(state_dict, r"^blocks\.(\d+)\."))
    if not depth:
        raise CheckpointError(f"{name}: the text tower has no encoder blocks")
    fields: dict[str, Any] = {"vocab_size": int(vocab_size), "embed_dim": int(embed_dim),
                              "context_length": int(context_length), "depth": depth,
                              "num_heads": max(1, int(embed_dim) // 64)}
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        fields["mlp_ratio"] = fc1.shape[0] / embed_dim
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
    fields["init_values"] = 1e-5 if "blocks.0.ls1.gamma" in state_dict else None
    proj = state_dict.get("text_projection.weight")
    fields["proj_dim"] = int(proj.shape[0]) if proj is not None else 0
    fields["proj_bias"] = "text_projection.bias" in state_dict
    fields.update({k: v for k, v in hints.items() if v is not None or k == "eos_token_id"})
    return fields


# ---- from ours -------------------------------------------------------------------------------------------------
def _detached(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def ours_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> open_clip ``CLIP``'s text keys (at the root): a bias-free projection becomes the bare
    ``text_projection`` (D, E); one with a bias stays an ``nn.Linear`` (open_clip's ``proj_bias=True``).

    Example:
        >>> sd = {"pos_embed": torch.zeros(1, 4, 8), "norm.weight": torch.ones(8), "text_projection.weight": torch.zeros(6, 8)}
        >>> {k: tuple(v.shape) for k, v in ours_to_openclip(sd).items()}
        {'positional_embedding': (4, 8), 'ln_final.weight': (8,), 'text_projection': (8, 6)}
    """
    sd = _detached(state_dict)
    for key in [k for k in sd if k.endswith(".attn.qkv.weight")]:  # nn.MultiheadAttention always has the bias
        sd.setdefault(key[:-len("weight")] + "bias", sd[key].new_zeros(sd[key].shape[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "pos_embed":
            out["positional_embedding"] = value[0]
        elif key.startswith("norm."):
            out["ln_final." + key[len("norm."):]] = value
        elif key == "text_projection.weight" and "text_projection.bias" not in sd:
            out["text_projection"] = value.t().contiguous()
        else:
            out.update(rename({key: value}, openclip.RULES, reverse=True))
    return out


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], siglip: bool) -> dict[str, torch.Tensor]:
    """Ours -> Hugging Face ``CLIPModel`` (``text_projection`` at the root) / ``SiglipModel`` (``text_model.head``)
    text keys.

    Example:
        >>> sorted(ours_to_hf({"pos_embed": torch.zeros(1, 4, 8), "text_projection.weight": torch.zeros(6, 8)}, False))
        ['text_model.embeddings.position_embedding.weight', 'text_projection.weight']
    """
    sd = _detached(state_dict)
    sd["pos_embed"] = sd["pos_embed"][0] if "pos_embed" in sd else None
    sd = {k: v for k, v in sd.items() if v is not None}
    for key in [k for k in sd if k.endswith(".attn.qkv.weight") and k[:-6] + "bias" not in sd]:
        sd[key[:-6] + "bias"] = sd[key].new_zeros(sd[key].shape[0])  # HF's q/k/v projections always have biases
    projection = {k: sd.pop(k) for k in ("text_projection.weight", "text_projection.bias") if k in sd}
    out = {"text_model." + k: v for k, v in rename(split_qkv(sd, _HF_PARTS, ENCODER_QKV_NAME), _HF_RULES,
                                                     reverse=True).items()}
    if siglip:
        out.update({"text_model.head." + k.split(".")[-1]: v for k, v in projection.items()})
    else:
        if "text_projection.bias" in projection:
            raise CheckpointError("CLIPModel's text_projection has no bias; this text tower's has one")
        out.update(projection)
    return out
