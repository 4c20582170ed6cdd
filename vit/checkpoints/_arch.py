"""Architecture of a checkpoint (inferred from tensor shapes + config hints) and of a model (its arguments)."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.config import ViTConfig
from ..models.vision import VisionTransformer
from ._common import CheckpointError


def architecture_of(model: VisionTransformer, training: bool = False) -> dict[str, Any]:
    """``model.config`` as a JSON-ready dict (with ``training=True`` also its dropout rates).

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
        >>> architecture_of(m)["depth"], architecture_of(m)["img_size"]
        (2, 32)
    """
    return model.config.to_dict(training=training)


# The standard ViT/DeiT widths (Ti/S/B/L/H) and their heads: the only widths whose heads may be guessed.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _num_heads(embed_dim: int, hints: Mapping[str, Any], name: str) -> int:
    if hints.get("num_heads"):
        return int(hints["num_heads"])
    if embed_dim in STANDARD_HEADS:
        return STANDARD_HEADS[embed_dim]  # load_pretrained warns that it guessed
    # Weights alone never tell the heads (qkv is (3D, D) for any split), and a wrong guess still loads
    # without complaint, with other outputs: refuse rather than guess.
    raise CheckpointError(
        f"{name}: the number of attention heads cannot be read from the weights (embed_dim {embed_dim} is not one "
        f"of the standard widths {', '.join(map(str, STANDARD_HEADS))}) and no config file records it. Pass it: "
        f"vit.load_pretrained(..., model={{'num_heads': N}}), `vit convert SOURCE OUT --num-heads N`, "
        f"`--model.backbone.num_heads N` with train.py's --model.backbone.pretrained, or the registered name of the "
        f"architecture "
        f"as model='NAME' (vit.list_models())")


def infer_architecture(state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None,
                       name: str = "<state dict>") -> ViTConfig:
    """The ``ViTConfig`` of a state dict in our layout, from its shapes; ``hints`` (config files, a registered
    name, the caller) supply what shapes cannot tell: number of heads, LayerNorm eps, activation, a non-square
    grid, the pooling. Without a ``num_heads`` hint the heads of a standard width (``STANDARD_HEADS``) are
    assumed; any other width raises ``CheckpointError``.

    Example:
        >>> sd = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).state_dict()
        >>> infer_architecture(sd, {"num_heads": 2}).depth
        2
    """
    hints = dict(hints or {})
    weight = state_dict.get("patch_embed.proj.weight")
    spt = weight is not None and weight.ndim == 2 and "patch_embed.norm.weight" in state_dict
    conv_stem = weight is not None and "patch_embed.stem.0.conv.weight" in state_dict
    if spt:  # Shifted Patch Tokenization: a linear projection of 5 x channels x patch x patch values
        in_chans = int(hints.get("in_chans") or 3)
        patch = math.isqrt(weight.shape[1] // (5 * in_chans))
        if 5 * in_chans * patch * patch != weight.shape[1]:
            raise CheckpointError(f"{name}: a shifted-patch embedding of {weight.shape[1]} inputs does not fit "
                                  f"{in_chans} channels; pass model={{'in_chans': C}}")
        embed_dim, patch_h, patch_w = weight.shape[0], patch, patch
    elif conv_stem:
        # convolutional stem: one stride-2 stage per halving of the patch, then a 1x1 projection
        stages = len({m.group(1) for k in state_dict if (m := re.match(r"^patch_embed\.stem\.(\d+)\.conv\.", k))})
        in_chans = state_dict["patch_embed.stem.0.conv.weight"].shape[1]
        embed_dim = weight.shape[0]
        patch_h = patch_w = 2 ** stages
    elif weight is None or weight.ndim != 4:
        raise CheckpointError(f"{name}: no 4-D patch embedding (patch_embed.proj.weight); cannot infer the model")
    else:
        embed_dim, in_chans, patch_h, patch_w = weight.shape
    if patch_h != patch_w:
        raise CheckpointError(f"{name}: non-square patches {patch_h}x{patch_w} are not supported")
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))})
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    if depth == 0 or fc1 is None or fc1.ndim != 2 or fc2 is None or fc2.ndim != 2:
        raise CheckpointError(f"{name}: no encoder blocks (blocks.0.mlp.fc1.weight, fc2.weight) found")
    class_token, distilled = "cls_token" in state_dict, "dist_token" in state_dict
    reg = state_dict.get("reg_token")
    reg_tokens = int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    prefix = int(class_token) + reg_tokens + int(distilled)
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise CheckpointError(f"{name}: no (1, tokens, dim) position embedding (pos_embed)")
    no_embed_class, grid = _position_layout(int(pos.shape[1]), prefix, (int(patch_h), int(patch_w)), hints, name)
    has_fc_norm, has_norm = "fc_norm.weight" in state_dict, "norm.weight" in state_dict
    if "attn_pool.latent" in state_dict:
        global_pool = "map"
    else:
        global_pool = hints.get("global_pool")
        if global_pool is None or global_pool == "map":
            global_pool = "avg" if has_fc_norm or not class_token else "token"
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]  # packed SwiGLU: fc1 makes both halves
    ls = state_dict.get("blocks.0.ls1.gamma")
    head = state_dict.get("head.weight")
    return ViTConfig(
        img_size=grid[0] * patch_h if grid[0] == grid[1] else (grid[0] * patch_h, grid[1] * patch_w),
        patch_size=int(patch_h), in_chans=int(in_chans), num_classes=int(head.shape[0]) if head is not None else 0,
        embed_dim=int(embed_dim), depth=depth, num_heads=_num_heads(int(embed_dim), hints, name),
        mlp_ratio=fc1.shape[0] / embed_dim, qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        global_pool=global_pool, class_token=class_token, distilled=distilled,
        fc_norm=has_fc_norm if (has_fc_norm or has_norm) else None, final_norm=has_fc_norm or has_norm,
        norm_eps=float(hints.get("norm_eps") or (1e-5 if "norm_pre.weight" in state_dict else 1e-6)),  # CLIP: 1e-5
        dynamic_img_size=bool(hints.get("dynamic_img_size", False)),
        # the gammas are loaded; init_values only says that LayerScale is there
        init_values=(hints.get("init_values") or 1e-5) if ls is not None else None,
        reg_tokens=reg_tokens, no_embed_class=no_embed_class, pre_norm="norm_pre.weight" in state_dict,
        act_layer=hints.get("act_layer") or ("silu" if swiglu else "gelu"), mlp_layer="swiglu" if swiglu else "mlp",
        embed_layer="spt" if spt else "conv_stem" if conv_stem else "conv",
        attn_layer="lsa" if "blocks.0.attn.scale" in state_dict else "mha",
        # attention windows have no weights: only a config file (or the caller) tells them
        window_size=int(hints.get("window_size") or 0),
        global_attn_indexes=tuple(hints.get("global_attn_indexes") or ()))


def _position_layout(length: int, prefix: int, patch: tuple[int, int], hints: Mapping[str, Any], name: str
                     ) -> tuple[bool, tuple[int, int]]:
    """(no_embed_class, patch grid) from the position table's length: it covers the prefix tokens as well
    (timm, JAX, DeiT) or the patches only (DeiT III, DINOv2 with registers). The image-size hint decides when
    given; otherwise the layout whose patch count is a square (the table with the prefix, if both are)."""
    layouts = [False, True] if prefix else [False]
    if "no_embed_class" in hints and prefix:
        layouts = [bool(hints["no_embed_class"])]
    size = hints.get("img_size")
    if size is not None:
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        grid = (height // patch[0], width // patch[1])
        for no_embed_class in layouts:
            if grid[0] * grid[1] == length - (0 if no_embed_class else prefix):
                return no_embed_class, grid
    for no_embed_class in layouts:
        patches = length - (0 if no_embed_class else prefix)
        side = math.isqrt(max(patches, 0))
        if side > 0 and side * side == patches:
            return no_embed_class, (side, side)
    raise CheckpointError(f"{name}: cannot tell the patch grid from {length} position embeddings ({prefix} prefix "
                          f"tokens); pass model=VisionTransformer(img_size=(H, W), ...)")


def _grid(arch: Mapping[str, Any]) -> tuple[int, int]:
    size = arch["img_size"]
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return height // arch["patch_size"], width // arch["patch_size"]
