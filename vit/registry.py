"""Named architectures: one table, name -> hyper-parameters, as in the ViT and DeiT papers."""
from __future__ import annotations

import difflib
from typing import Any

from .model import VisionTransformer

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


def _build_table() -> dict[str, dict[str, Any]]:
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
    return table


MODELS: dict[str, dict[str, Any]] = _build_table()


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered architecture names matching a shell-style pattern.

    Example:
        >>> list_models("vit_base_patch16*")
        ['vit_base_patch16_224', 'vit_base_patch16_384']
    """
    import fnmatch
    names = sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))
    return [n for n in names if n in WEIGHTS] if pretrained else names


def model_config(name: str) -> dict[str, Any]:
    """The hyper-parameters of a registered architecture; a close-match hint for unknown names."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=5, cutoff=0.5)
        hint = f" Closest registered names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model name {name!r}.{hint} See vit.list_models() for all {len(MODELS)}.")
    return dict(MODELS[name])


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> VisionTransformer:
    """Build a registered architecture; keyword arguments override the table (e.g. ``num_classes=10``).

    With ``pretrained=True`` the weights named in ``WEIGHTS`` are loaded (through the Hugging Face hub
    cache; see ``vit.load_pretrained``), adapted to ``num_classes`` / ``img_size`` overrides.

    Example:
        >>> create_model("vit_tiny_patch16_224", num_classes=10).head.out_features
        10
    """
    config = model_config(name)
    if pretrained:
        if name not in WEIGHTS:
            raise ValueError(f"no pretrained weights are registered for {name!r}; "
                             f"models with weights: {', '.join(list_models(pretrained=True))}")
        from .checkpoints import load_pretrained
        adapt = {k: overrides.pop(k) for k in ("num_classes", "img_size", "patch_size") if k in overrides}
        model = load_pretrained(WEIGHTS[name], model=VisionTransformer(**{**config, **overrides}), **adapt)
        return model
    config.update(overrides)
    return VisionTransformer(**config)
