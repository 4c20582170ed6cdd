"""The registry: timm's names, timm's architectures (every parameter's name and shape), timm's hub tags."""
import pytest
import timm
import torch

import vit
from vit.models.registry import MODELS, WEIGHTS

FAMILIES = [n for n in MODELS if any(f in n for f in ("dinov2", "deit3_", "_clip_", "_siglip_"))]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_names_build_timms_architecture(name):
    with torch.device("meta"):  # shapes only: a billion-parameter model costs nothing here
        theirs = timm.create_model(name, pretrained=False)
        ours = vit.create_model(name)
    assert _shapes(ours) == _shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    block, their_block = ours.blocks[0], theirs.blocks[0]
    assert type(block.mlp.act).__name__ == type(their_block.mlp.act).__name__.replace("GELUTanh", "GELU")
    if type(their_block.mlp.act).__name__ == "GELUTanh":
        assert block.mlp.act.approximate == "tanh"
    assert block.norm1.eps == their_block.norm1.eps


def test_listing_by_family():
    assert "vit_small_patch14_reg4_dinov2" in vit.list_models("*dinov2*")
    assert {"vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224"} <= set(vit.list_models("*clip*"))
    assert "vit_so400m_patch14_siglip_224" in vit.list_models("*siglip*")
    assert "deit3_base_patch16_224" in vit.list_models("deit3*")


def test_default_weights_are_tags_timm_publishes():
    published = set(timm.list_pretrained())
    for name in FAMILIES:
        assert WEIGHTS[name].startswith("hf-hub:timm/")
        assert WEIGHTS[name].removeprefix("hf-hub:timm/") in published, name
    assert WEIGHTS["vit_small_patch14_dinov2"] == "hf-hub:timm/vit_small_patch14_dinov2.lvd142m"
    assert WEIGHTS["vit_base_patch16_clip_224"] == "hf-hub:timm/vit_base_patch16_clip_224.openai"
    assert WEIGHTS["vit_base_patch16_siglip_224"] == "hf-hub:timm/vit_base_patch16_siglip_224.webli"
    assert WEIGHTS["deit3_base_patch16_224"] == "hf-hub:timm/deit3_base_patch16_224.fb_in22k_ft_in1k"
