"""Google ViT / AugReg / big_vision ``.npz`` (JAX/Flax arrays) <-> our (timm) layout.

Two index conventions exist for the sub-modules of an encoder block:
original ViT / AugReg: ``LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3``, one
``Transformer/encoderblock_N/`` per block; big_vision: ``LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0``, often scanned (one ``Transformer/encoderblock/`` whose arrays stack the blocks
on axis 0), with the position embedding at ``pos_embedding``. Both are read; both can be written.
SigLIP image towers (``params/img/``) have no class token and pool with ``MAPHead_0`` (a learned ``probe``
attending to the tokens, then ``LayerNorm_0`` and a residual ``MlpBlock_0``): our ``attn_pool``.
Flax kernels are (in, out) and HWIO; attention kernels keep the head axis: query (D, heads, D/heads).
These weights expect mean = std = 0.5; the JAX code resizes position embeddings bilinearly.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._common import HALF, CheckpointError, block_indices

NAME = "npz"
SIGNATURE = r"(?:opt/target/|params/img/|params/)?embedding/kernel"
DEFAULTS: dict[str, Any] = {"mean": list(HALF), "std": list(HALF), "interpolation": "bicubic", "crop_pct": 0.9}
HEAD_EXTRAS = ("pre_logits/",)  # the representation layer of original in21k weights; feeds the head only
# our keys from_timm writes; any other (LayerScale, registers, norm_pre) has no place in the layout
_EXPORTED = re.compile(r"^(?:patch_embed\.proj\.|pos_embed$|cls_token$|norm\.|head\.|attn_pool\.|blocks\.\d+\."
                       r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.)")


def _prefix(keys) -> str:
    for prefix in ("opt/target/", "params/img/", "params/"):
        if f"{prefix}embedding/kernel" in keys:
            return prefix
    return ""


def to_timm(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Google layout (either convention, any of the ``opt/target/``, ``params/`` prefixes) -> ours.

    Arrays it does not use stay under their own names, so the key check reports them; missing ones
    simply produce no key, so the key check reports those too.

    Example:
        >>> to_timm({"embedding/kernel": torch.zeros(16, 16, 3, 8)})["patch_embed.proj.weight"].shape
        torch.Size([8, 3, 16, 16])
    """
    prefix = _prefix(arrays)
    w = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str, index: int | None = None) -> torch.Tensor:
        value = w[name]  # KeyError = missing array: the caller skips this parameter
        used.add(name)
        return value[index] if index is not None else value

    def put(key: str, fn) -> None:
        try:
            out[key] = fn()
        except KeyError:
            pass
        except (IndexError, RuntimeError) as error:
            raise CheckpointError(f"array for {key} has an unexpected shape: {error}") from error

    put("patch_embed.proj.weight", lambda: take("embedding/kernel").permute(3, 2, 0, 1))
    put("patch_embed.proj.bias", lambda: take("embedding/bias"))
    put("cls_token", lambda: take("cls"))
    pos_name = "Transformer/posembed_input/pos_embedding" if "Transformer/posembed_input/pos_embedding" in w \
        else "pos_embedding"
    put("pos_embed", lambda: take(pos_name).reshape(1, -1, take(pos_name).shape[-1]))
    put("norm.weight", lambda: take("Transformer/encoder_norm/scale"))
    put("norm.bias", lambda: take("Transformer/encoder_norm/bias"))
    put("head.weight", lambda: take("head/kernel").T)
    put("head.bias", lambda: take("head/bias"))
    # big_vision's MAP head (SigLIP): a probe attends to the tokens, then a residual MLP; key and value fused
    # into timm's kv in that order
    put("attn_pool.latent", lambda: take("MAPHead_0/probe").reshape(1, -1, take("MAPHead_0/probe").shape[-1]))
    head_att = "MAPHead_0/MultiHeadDotProductAttention_0/"
    put("attn_pool.q.weight", lambda: take(f"{head_att}query/kernel").flatten(1).T)
    put("attn_pool.q.bias", lambda: take(f"{head_att}query/bias").reshape(-1))
    put("attn_pool.kv.weight", lambda: torch.cat(
        [take(f"{head_att}{n}/kernel").flatten(1).T for n in ("key", "value")]))
    put("attn_pool.kv.bias", lambda: torch.cat([take(f"{head_att}{n}/bias").reshape(-1) for n in ("key", "value")]))
    put("attn_pool.proj.weight", lambda: take(f"{head_att}out/kernel").flatten(0, 1).T)
    put("attn_pool.proj.bias", lambda: take(f"{head_att}out/bias"))
    put("attn_pool.norm.weight", lambda: take("MAPHead_0/LayerNorm_0/scale"))
    put("attn_pool.norm.bias", lambda: take("MAPHead_0/LayerNorm_0/bias"))
    for r in range(2):
        put(f"attn_pool.mlp.fc{r + 1}.weight", lambda: take(f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel").T)
        put(f"attn_pool.mlp.fc{r + 1}.bias", lambda: take(f"MAPHead_0/MlpBlock_0/Dense_{r}/bias"))

    stacked = "Transformer/encoderblock/LayerNorm_0/scale" in w
    original = any("MultiHeadDotProductAttention_1/" in k for k in w)
    mha, mlp, ln2 = (1, 3, 2) if original else (0, 0, 1)
    if stacked:
        depth = int(w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
        blocks = [("Transformer/encoderblock/", i, i) for i in range(depth)]
    else:
        blocks = [(f"Transformer/encoderblock_{i}/", None, i)
                  for i in block_indices(w, r"^Transformer/encoderblock_(\d+)/")]
    for path, idx, i in blocks:
        att = f"{path}MultiHeadDotProductAttention_{mha}/"
        b = f"blocks.{i}."
        put(b + "norm1.weight", lambda: take(f"{path}LayerNorm_0/scale", idx))
        put(b + "norm1.bias", lambda: take(f"{path}LayerNorm_0/bias", idx))
        # query/key/value kernels (D, heads, D/heads) -> rows of timm's fused (3D, D) qkv, in q, k, v order
        put(b + "attn.qkv.weight", lambda: torch.cat(
            [take(f"{att}{n}/kernel", idx).flatten(1).T for n in ("query", "key", "value")]))
        put(b + "attn.qkv.bias", lambda: torch.cat(
            [take(f"{att}{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")]))
        put(b + "attn.proj.weight", lambda: take(f"{att}out/kernel", idx).flatten(0, 1).T)  # (heads, D/h, D)
        put(b + "attn.proj.bias", lambda: take(f"{att}out/bias", idx))
        put(b + "norm2.weight", lambda: take(f"{path}LayerNorm_{ln2}/scale", idx))
        put(b + "norm2.bias", lambda: take(f"{path}LayerNorm_{ln2}/bias", idx))
        for r in range(2):
            put(b + f"mlp.fc{r + 1}.weight", lambda: take(f"{path}MlpBlock_{mlp}/Dense_{r}/kernel", idx).T)
            put(b + f"mlp.fc{r + 1}.bias", lambda: take(f"{path}MlpBlock_{mlp}/Dense_{r}/bias", idx))
    out.update({k: v for k, v in w.items() if k not in used})
    return {k: v.contiguous() for k, v in out.items()}


def num_heads(arrays: Mapping[str, torch.Tensor]) -> int | None:
    """Heads, read off the query kernel's shape (D, heads, D/heads) — the one format that records them.

    Example:
        >>> num_heads({"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel": torch.zeros(8, 2, 4)})
        2
    """
    for key, value in arrays.items():
        if re.search(r"MultiHeadDotProductAttention_\d/query/kernel$", key) and "MAPHead" not in key:
            return int(value.shape[-2])
    return None


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any],
              big_vision: bool = False) -> dict[str, np.ndarray]:
    """Ours -> Google layout as numpy arrays for ``np.savez``: the original ViT convention, or with
    ``big_vision=True`` big_vision's (scanned blocks, ``_0/_0/_1`` indices, root ``pos_embedding``).
    Attention pooling is written as big_vision's ``MAPHead_0``; what the layout cannot hold (LayerScale,
    registers, ``norm_pre``, SwiGLU, a distillation token, ``fc_norm``) raises ``CheckpointError``.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> from_timm(m.state_dict(), {"num_heads": 2})["embedding/kernel"].shape
        (8, 8, 3, 32)
    """
    if architecture.get("distilled") or architecture.get("fc_norm"):
        raise CheckpointError("the Google .npz layout has no distillation token and no fc_norm")
    if architecture.get("mlp_layer", "mlp") != "mlp":
        raise CheckpointError(f"the Google .npz layout has plain MLPs only, not {architecture['mlp_layer']!r}")
    # anything else would be dropped without a word: LayerScale, registers, CLIP's norm_pre
    unwritable = sorted(k for k in state_dict if not _EXPORTED.match(k))
    if unwritable:
        raise CheckpointError(f"the Google .npz layout has no place for {', '.join(unwritable)}")
    heads = architecture["num_heads"]
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        ("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"): sd["pos_embed"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    if "norm.weight" in sd:
        out["Transformer/encoder_norm/scale"] = sd["norm.weight"]
        out["Transformer/encoder_norm/bias"] = sd["norm.bias"]
    if "head.weight" in sd:
        out["head/kernel"] = sd["head.weight"].T
        out["head/bias"] = sd["head.bias"]
    if "attn_pool.latent" in sd:
        out.update(_map_head(sd, heads))
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    per_block: list[dict[str, torch.Tensor]] = []
    for i in block_indices(sd, r"^blocks\.(\d+)\."):
        b = f"blocks.{i}."
        dim = sd[b + "attn.qkv.weight"].shape[1]
        block = {"LayerNorm_0/scale": sd[b + "norm1.weight"], "LayerNorm_0/bias": sd[b + "norm1.bias"],
                 f"LayerNorm_{ln2}/scale": sd[b + "norm2.weight"], f"LayerNorm_{ln2}/bias": sd[b + "norm2.bias"]}
        att = f"MultiHeadDotProductAttention_{mha}/"
        qkv_bias = sd.get(b + "attn.qkv.bias", torch.zeros(3 * dim))  # no bias = zero bias in Flax's Dense
        for name, weight, bias in zip(("query", "key", "value"), sd[b + "attn.qkv.weight"].chunk(3),
                                      qkv_bias.chunk(3)):
            block[f"{att}{name}/kernel"] = weight.T.reshape(dim, heads, dim // heads)
            block[f"{att}{name}/bias"] = bias.reshape(heads, dim // heads)
        block[f"{att}out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        block[f"{att}out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            block[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            block[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        per_block.append(block)
    if big_vision:
        for name in per_block[0]:
            out[f"Transformer/encoderblock/{name}"] = torch.stack([blk[name] for blk in per_block])
    else:
        for i, block in enumerate(per_block):
            out.update({f"Transformer/encoderblock_{i}/{name}": v for name, v in block.items()})
    return {k: np.ascontiguousarray(v.numpy()) for k, v in out.items()}


def _map_head(sd: Mapping[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Our attention pool -> big_vision's ``MAPHead_0`` (Flax MHA kernels keep the head axis)."""
    dim = sd["attn_pool.latent"].shape[-1]
    att = "MAPHead_0/MultiHeadDotProductAttention_0/"
    zeros = torch.zeros(dim)  # no bias = zero bias in Flax's Dense
    key, value = sd["attn_pool.kv.weight"].chunk(2)
    key_bias, value_bias = sd.get("attn_pool.kv.bias", torch.zeros(2 * dim)).chunk(2)
    out = {"MAPHead_0/probe": sd["attn_pool.latent"]}
    for name, weight, bias in (("query", sd["attn_pool.q.weight"], sd.get("attn_pool.q.bias", zeros)),
                               ("key", key, key_bias), ("value", value, value_bias)):
        out[f"{att}{name}/kernel"] = weight.T.reshape(dim, heads, dim // heads)
        out[f"{att}{name}/bias"] = bias.reshape(heads, dim // heads)
    out[f"{att}out/kernel"] = sd["attn_pool.proj.weight"].T.reshape(heads, dim // heads, dim)
    out[f"{att}out/bias"] = sd["attn_pool.proj.bias"]
    out["MAPHead_0/LayerNorm_0/scale"] = sd["attn_pool.norm.weight"]
    out["MAPHead_0/LayerNorm_0/bias"] = sd["attn_pool.norm.bias"]
    for r in range(2):
        out[f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel"] = sd[f"attn_pool.mlp.fc{r + 1}.weight"].T
        out[f"MAPHead_0/MlpBlock_0/Dense_{r}/bias"] = sd[f"attn_pool.mlp.fc{r + 1}.bias"]
    return out
