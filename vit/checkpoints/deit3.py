"""DeiT III as released by facebookresearch/deit (``models_v2.py``, ``deit_3_*.pth``) <-> our layout.

The keys are timm's except LayerScale, a parameter of the block itself (``blocks.N.gamma_1``/``gamma_2``) rather
than of a sub-module (``ls1.gamma``/``ls2.gamma``). The position table covers the patches only: the class token
is concatenated after the positions are added (our ``no_embed_class``, inferred from the table's length).
LayerNorm eps 1e-6, exact GELU, qkv biases, as our defaults. The files nest the weights as ``{"model": ...}``,
which the reader unwraps. ImageNet mean/std, bicubic; the in1k models were evaluated at crop 0.875.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, rename

NAME = "deit3"
SIGNATURE = r"blocks\.\d+\.gamma_1"  # timm's files say blocks.N.ls1.gamma
DEFAULTS: dict[str, Any] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                            "crop_pct": 0.875}

RULES = [
    ("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
]


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeiT III original -> ours. The parallel-block variants' extra keys (``gamma_1_1``, ``norm11``, ...) have
    no counterpart and are reported by the key check.

    Example:
        >>> to_timm({"blocks.3.gamma_2": torch.ones(8)}).keys()
        dict_keys(['blocks.3.ls2.gamma'])
    """
    return rename(state_dict, RULES)


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Ours -> DeiT III original, loadable by ``models_v2.vit_models`` with ``Layer_scale_init_Block``.

    A class-token position row (a model without ``no_embed_class``) is folded into the class token, and a
    model without LayerScale gets gammas of one: the outputs stay the same. DeiT III has a class token, token
    pooling and a final norm, and no registers, distillation token, fc_norm or norm_pre; anything else raises.

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
        ...                       init_values=1e-6, no_embed_class=True)
        >>> sd = from_timm(m.state_dict(), m.config.to_dict())
        >>> sd["blocks.0.gamma_1"].shape, sd["pos_embed"].shape
        (torch.Size([32]), torch.Size([1, 4, 32]))
    """
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    unsupported = sorted(k for k in sd if k.startswith(("reg_token", "dist_token", "head_dist.", "fc_norm.",
                                                          "norm_pre.", "attn_pool.")))
    if (unsupported or "cls_token" not in sd or "norm.weight" not in sd
            or architecture.get("global_pool", "token") != "token" or architecture.get("mlp_layer") == "swiglu"
            or architecture.get("act_layer", "gelu") != "gelu"):
        raise CheckpointError(f"DeiT III's layout is a class token pooled by a final norm and head, GELU MLPs, "
                              f"and no registers, distillation token, fc_norm, attention pool or norm_pre; "
                              f"cannot export {', '.join(unsupported) or 'this architecture'}")
    if not architecture.get("no_embed_class"):
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    for key in [k for k in sd if k.endswith(".norm1.weight")]:
        block = key[:-len("norm1.weight")]
        sd.setdefault(block + "ls1.gamma", torch.ones_like(sd[key]))
        sd.setdefault(block + "ls2.gamma", torch.ones_like(sd[key]))
        sd.setdefault(block + "attn.qkv.bias", torch.zeros(3 * sd[key].shape[0], dtype=sd[key].dtype))
    return rename(sd, RULES, reverse=True)


def hints(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights do not record: DeiT III's heads (64 wide, but 16 heads of 80 for huge).

    Example:
        >>> hints({"patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)})
        {'num_heads': 8}
    """
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None:
        return {}
    width = int(weight.shape[0])
    return {"num_heads": 16} if width == 1280 else {"num_heads": width // 64} if width % 64 == 0 else {}
