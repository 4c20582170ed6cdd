"""``create_model``: a registered architecture, optionally with its pretrained weights (above the registry
and the checkpoint loaders, so neither imports the other)."""
from __future__ import annotations

from typing import Any

from ..models.registry import WEIGHTS, list_models, model_config
from ..models.vision import VisionTransformer
from . import load_pretrained


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> VisionTransformer:
    """Build a registered architecture; keyword arguments override its ``ViTConfig`` (e.g. ``num_classes=10``).

    With ``pretrained=True`` the weights named in ``vit.models.registry.WEIGHTS`` are loaded (through the Hugging Face
    hub cache; see ``vit.load_pretrained``), or those of timm's tag in ``name.tag`` (``vit_base_patch16_224.mae``
    -> ``hf-hub:timm/vit_base_patch16_224.mae``). The checkpoint's head is kept unless ``num_classes`` is given;
    ``num_classes`` / ``img_size`` / ``patch_size`` overrides re-initialise the head or resample.

    Example:
        >>> create_model("vit_tiny_patch16_224", num_classes=10).head.out_features
        10
    """
    name, _, tag = name.partition(".")
    config = model_config(name)
    if not pretrained:
        return VisionTransformer(config, **overrides)
    source = f"hf-hub:timm/{name}.{tag}" if tag else WEIGHTS.get(name)
    if source is None:
        raise ValueError(f"no pretrained weights are registered for {name!r}; name a timm tag "
                         f"({name}.TAG) or pick one of: {', '.join(list_models(pretrained=True))}")
    adapt = {k: overrides.pop(k) for k in ("num_classes", "img_size", "patch_size") if k in overrides}
    architecture = {**config.to_dict(training=False), **overrides}
    architecture.pop("num_classes")  # the checkpoint's head, unless num_classes says otherwise
    return load_pretrained(source, model=architecture, **adapt)
