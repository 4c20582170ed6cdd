"""Named architectures: one table, name -> ViTConfig, as in the ViT and DeiT papers (timm's names).

A leaf: it knows configurations and where their weights live, and builds nothing (``vit.create_model`` does).
"""
from __future__ import annotations

import difflib
from typing import Any

from .config import ViTConfig

# width, depth, heads (ViT paper table 1; Ti/S from DeiT)
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

# Where `create_model(name, pretrained=True)` finds weights (timm's default tags on the Hugging Face hub).
# Google/AugReg weights expect mean = std = 0.5; DeiT weights expect ImageNet mean/std.
_AUGREG = "augreg_in21k_ft_in1k"
WEIGHTS: dict[str, str] = {
    "vit_tiny_patch16_224": f"hf-hub:timm/vit_tiny_patch16_224.{_AUGREG}",
    "vit_tiny_patch16_384": f"hf-hub:timm/vit_tiny_patch16_384.{_AUGREG}",
    "vit_small_patch16_224": f"hf-hub:timm/vit_small_patch16_224.{_AUGREG}",
    "vit_small_patch16_384": f"hf-hub:timm/vit_small_patch16_384.{_AUGREG}",
    "vit_small_patch32_224": f"hf-hub:timm/vit_small_patch32_224.{_AUGREG}",
    "vit_small_patch32_384": f"hf-hub:timm/vit_small_patch32_384.{_AUGREG}",
    "vit_base_patch8_224": f"hf-hub:timm/vit_base_patch8_224.{_AUGREG}",
    "vit_base_patch16_224": "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base_patch16_384": f"hf-hub:timm/vit_base_patch16_384.{_AUGREG}",
    "vit_base_patch32_224": f"hf-hub:timm/vit_base_patch32_224.{_AUGREG}",
    "vit_base_patch32_384": f"hf-hub:timm/vit_base_patch32_384.{_AUGREG}",
    "vit_large_patch16_224": f"hf-hub:timm/vit_large_patch16_224.{_AUGREG}",
    "vit_large_patch16_384": f"hf-hub:timm/vit_large_patch16_384.{_AUGREG}",
    "vit_large_patch32_384": "hf-hub:timm/vit_large_patch32_384.orig_in21k_ft_in1k",
    "deit_tiny_patch16_224": "hf-hub:timm/deit_tiny_patch16_224.fb_in1k",
    "deit_small_patch16_224": "hf-hub:timm/deit_small_patch16_224.fb_in1k",
    "deit_base_patch16_224": "hf-hub:timm/deit_base_patch16_224.fb_in1k",
    "deit_base_patch16_384": "hf-hub:timm/deit_base_patch16_384.fb_in1k",
    "deit_tiny_distilled_patch16_224": "hf-hub:timm/deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224": "hf-hub:timm/deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224": "hf-hub:timm/deit_base_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_384": "hf-hub:timm/deit_base_distilled_patch16_384.fb_in1k",
}


def _build_table() -> dict[str, ViTConfig]:
    table: dict[str, dict[str, Any]] = {}
    for size, dims in SIZES.items():
        for patch in (8, 14, 16, 32):
            for img_size in (224, 384):
                if img_size == 384 and patch not in (16, 32):
                    continue  # the papers fine-tune at 384 with patch 16 and 32 only
                table[f"vit_{size}_patch{patch}_{img_size}"] = dict(img_size=img_size, patch_size=patch, **dims)
    for size in ("tiny", "small", "base"):
        for distilled in (False, True):
            tag = "_distilled" if distilled else ""
            table[f"deit_{size}{tag}_patch16_224"] = dict(img_size=224, patch_size=16, distilled=distilled,
                                                          **SIZES[size])
    table["deit_base_patch16_384"] = dict(img_size=384, patch_size=16, **SIZES["base"])
    table["deit_base_distilled_patch16_384"] = dict(img_size=384, patch_size=16, distilled=True, **SIZES["base"])
    table.update(_families())
    return {name: ViTConfig(**fields) for name, fields in table.items()}


# The families people fine-tune today, with timm's names and arguments (their defaults: timm's, checked by
# tests/models/test_registry.py against timm's own models, parameter for parameter).
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu", act_layer="silu")
_MEDIUM = dict(embed_dim=512, depth=12, num_heads=8)
_SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)


def _families() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    # DINOv2 (Oquab et al. 2023) and DINOv2 with registers (Darcet et al. 2024): LayerScale, 518 px, no head
    for size in ("small", "base", "large", "giant"):
        dims = _GIANT if size == "giant" else SIZES[size]
        dinov2 = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, **dims)
        table[f"vit_{size}_patch14_dinov2"] = dinov2
        table[f"vit_{size}_patch14_reg4_dinov2"] = dict(dinov2, reg_tokens=4, no_embed_class=True)
    # DeiT III (Touvron et al. 2022): LayerScale, position embeddings for the patches only
    for size, patch, img_size in (("small", 16, 224), ("small", 16, 384), ("medium", 16, 224), ("base", 16, 224),
                                  ("base", 16, 384), ("large", 16, 224), ("large", 16, 384), ("huge", 14, 224)):
        dims = _MEDIUM if size == "medium" else SIZES[size]
        table[f"deit3_{size}_patch{patch}_{img_size}"] = dict(img_size=img_size, patch_size=patch, init_values=1e-6,
                                                              no_embed_class=True, **dims)
    # CLIP image towers (Radford et al. 2021; OpenCLIP): pre-norm, eps 1e-5; OpenAI's are QuickGELU, and timm's
    # _quickgelu names default to the image-embedding projection as the head
    for size, patch, img_size, quick, classes in (
            ("base", 32, 224, False, 1000), ("base", 16, 224, False, 1000), ("large", 14, 224, False, 1000),
            ("large", 14, 336, False, 1000), ("huge", 14, 224, False, 1000), ("base", 32, 224, True, 512),
            ("base", 16, 224, True, 512), ("large", 14, 224, True, 768), ("large", 14, 336, True, 768),
            ("huge", 14, 224, True, 1024), ("huge", 14, 378, True, 1024)):
        name = f"vit_{size}_patch{patch}_clip_{'quickgelu_' if quick else ''}{img_size}"
        table[name] = dict(img_size=img_size, patch_size=patch, pre_norm=True, norm_eps=1e-5, num_classes=classes,
                           act_layer="quick_gelu" if quick else "gelu", **SIZES[size])
    # SigLIP / SigLIP 2 image towers (Zhai et al. 2023; Tschannen et al. 2025): no class token, attention
    # pooling (or average pooling without fc_norm: _gap), no head; the SigLIP-2-only shapes use tanh GELU
    for size, patch, sizes, act in (("base", 16, (224, 256, 384, 512), "gelu"), ("base", 32, (256,), "gelu_tanh"),
                                    ("large", 16, (256, 384), "gelu"), ("large", 16, (512,), "gelu_tanh"),
                                    ("so400m", 14, (224, 378), "gelu"),
                                    ("so400m", 16, (256, 384, 512), "gelu_tanh")):
        dims = _SO400M if size == "so400m" else SIZES[size]
        for img_size in sizes:
            siglip = dict(img_size=img_size, patch_size=patch, class_token=False, num_classes=0, act_layer=act, **dims)
            table[f"vit_{size}_patch{patch}_siglip_{img_size}"] = dict(siglip, global_pool="map")
            table[f"vit_{size}_patch{patch}_siglip_gap_{img_size}"] = dict(siglip, global_pool="avg", fc_norm=False)
    return table


def _default_tag(name: str) -> str | None:
    """timm's hub tag that ``create_model(name, pretrained=True)`` loads for a family name (None: not one)."""
    if "dinov2" in name:
        return "lvd142m"
    if name.startswith("deit3_"):
        return "fb_in22k_ft_in1k"
    if "_clip_" in name:
        if name.startswith("vit_huge"):
            return "dfn5b"
        return "openai" if name.endswith(("_224", "_336")) else None
    if "_siglip_" in name:  # SigLIP where it exists, else SigLIP 2
        return "v2_webli" if "patch32" in name or "so400m_patch16" in name or "large_patch16_siglip_512" in name \
            or "large_patch16_siglip_gap_512" in name else "webli"
    return None


MODELS: dict[str, ViTConfig] = _build_table()
WEIGHTS.update({name: f"hf-hub:timm/{name}.{tag}" for name in MODELS if (tag := _default_tag(name)) is not None})


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered architecture names matching a shell-style pattern.

    Example:
        >>> list_models("deit3_base*")
        ['deit3_base_patch16_224', 'deit3_base_patch16_384']
    """
    import fnmatch
    names = sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))
    return [n for n in names if n in WEIGHTS] if pretrained else names


def model_config(name: str) -> ViTConfig:
    """The architecture of a registered name; unknown names raise ``ValueError`` with the closest ones.

    Example:
        >>> model_config("vit_small_patch16_224").embed_dim
        384
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=5, cutoff=0.5)
        hint = f" Closest registered names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model name {name!r}.{hint} See vit.list_models() for all {len(MODELS)}.")
    return MODELS[name]  # frozen: callers change copies (config.replace)
