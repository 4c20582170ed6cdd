"""DINOv2 as released by facebookresearch (``torch.hub`` ``dinov2_vit*14[_reg]`` ``.pth`` files) <-> our layout.

The keys are timm's but for four things. ``mask_token`` (the iBOT masking embedding, unused at inference) is
dropped. Registers are ``register_tokens`` (1, R, D). The position table always has the class token's row, also
in the register models, whose original forward is ``cat(cls, patches) + pos`` with the registers inserted after
the class token without a position; we fold that row into the class token (what timm's ``*_reg4_dinov2`` models
hold, with ``no_embed_class``), which gives the same tokens at any image size because the class row is never
resampled. Giant's packed SwiGLU is ``mlp.w12`` (both halves, ``silu(first) * second``, the order of our ``fc1``)
and ``mlp.w3``. LayerScale is ``ls1.gamma``/``ls2.gamma`` as ours; LayerNorm eps 1e-6 as our default.
Training checkpoints with ``block_chunks`` nest the blocks one level deeper (``blocks.CHUNK.INDEX.``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, rename

NAME = "dinov2"
SIGNATURE = r"mask_token"  # no other layout has it at the root (Hugging Face's is embeddings.mask_token)
DEFAULTS: dict[str, Any] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                            "crop_pct": 1.0}

RULES = [
    ("register_tokens", "reg_token"),
    ("blocks.{i}.mlp.w12.", "blocks.{i}.mlp.fc1."),
    ("blocks.{i}.mlp.w3.", "blocks.{i}.mlp.fc2."),
]
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 original -> ours (see the module docstring for what changes).

    Example:
        >>> sd = {"mask_token": torch.zeros(1, 8), "cls_token": torch.ones(1, 1, 8),
        ...       "pos_embed": torch.ones(1, 5, 8), "register_tokens": torch.zeros(1, 4, 8)}
        >>> out = to_timm(sd)
        >>> sorted(out), out["pos_embed"].shape[1], out["cls_token"][0, 0, 0].item()
        (['cls_token', 'pos_embed', 'reg_token'], 4, 2.0)
    """
    out = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in state_dict.items() if k != "mask_token"}
    out = rename(out, RULES)
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # the class token's position, added once and for all
        out["pos_embed"] = pos[:, 1:]
    return out


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> DINOv2 original, loadable with ``strict=True`` by ``dinov2.models.vision_transformer``'s
    ``DinoVisionTransformer`` (``mask_token`` written as zeros; ``block_chunks=0``, the hub's setting).

    The class token's position row is zero where our model has none (``no_embed_class``); position rows of
    registers are folded into ``register_tokens``: the outputs stay the same. A classifier head, distillation
    token, ``fc_norm``, attention pooling, CLIP's ``norm_pre`` or an activation other than the original's (GELU;
    SiLU in SwiGLU) have no place in the layout and raise.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0,
        ...                       init_values=1e-5, reg_tokens=4, no_embed_class=True)
        >>> sd = from_timm(m.state_dict(), m.config.to_dict())
        >>> sd["pos_embed"].shape, sd["register_tokens"].shape, "mask_token" in sd
        (torch.Size([1, 5, 32]), torch.Size([1, 4, 32]), True)
    """
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    unsupported = sorted(k for k in sd if k.startswith(("head.", "head_dist.", "dist_token", "fc_norm.",
                                                          "norm_pre.", "attn_pool.")))
    if unsupported or "cls_token" not in sd or "norm.weight" not in sd:
        raise CheckpointError(f"DINOv2's layout has a class token and a final norm, and no classifier head, "
                              f"distillation token, fc_norm, attention pool or norm_pre; cannot export "
                              f"{', '.join(unsupported) or 'a model without a class token or final norm'} "
                              f"(a fine-tuned model: reset_classifier(0) first)")
    swiglu = architecture.get("mlp_layer") == "swiglu"
    act_layer = architecture.get("act_layer", "gelu")
    if act_layer != ("silu" if swiglu else "gelu"):
        raise CheckpointError(f"DINOv2's {'SwiGLU' if swiglu else 'MLP'} uses {'silu' if swiglu else 'gelu'}; "
                              f"cannot export a model with act_layer={act_layer!r}")
    dim = sd["cls_token"].shape[-1]
    pos, cls = sd["pos_embed"], sd["cls_token"]
    if architecture.get("no_embed_class"):
        pos = torch.cat([torch.zeros_like(cls), pos], dim=1)
    elif "reg_token" in sd:  # positions of the registers: added to them once and for all
        regs = sd["reg_token"].shape[1]
        sd["reg_token"] = sd["reg_token"] + pos[:, 1:1 + regs]
        pos = torch.cat([pos[:, :1], pos[:, 1 + regs:]], dim=1)
    sd["pos_embed"] = pos
    for key in [k for k in sd if k.endswith(".attn.qkv.weight")]:  # DINOv2 always has qkv biases
        sd.setdefault(key[:-len("weight")] + "bias", torch.zeros(sd[key].shape[0], dtype=sd[key].dtype))
    sd["mask_token"] = torch.zeros(1, dim, dtype=cls.dtype)
    return rename(sd, RULES if swiglu else RULES[:1], reverse=True)


def hints(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights do not record: every DINOv2 model has 64-wide attention heads (S/6, B/12, L/16, g/24).

    Example:
        >>> hints({"patch_embed.proj.weight": torch.zeros(1536, 3, 14, 14)})
        {'num_heads': 24}
    """
    weight = state_dict.get("patch_embed.proj.weight")
    return {"num_heads": int(weight.shape[0]) // 64} if weight is not None and weight.shape[0] % 64 == 0 else {}
