"""Hugging Face DINOv2 (+ registers), CLIP and SigLIP checkpoints against transformers itself: tiny models with
every parameter random, saved with ``save_pretrained`` and loaded with no hints; all tokens, the pooled features
and the projected embedding agree (<= 1e-4). Export goes the other way: transformers loads what we write."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from conftest import randomize_
from safetensors.torch import save_file

import vit
from vit.checkpoints import CheckpointError, architecture_of, detect_format, export_state_dict, hf_module

TOL = 1e-4
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 64,
            "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _hf(cls, config_cls, **config):
    torch.manual_seed(0)
    return randomize_(getattr(transformers, cls)(getattr(transformers, config_cls)(**config))).eval()


def _dinov2(registers=0, **overrides):
    config = {k: v for k, v in SMALL.items() if k != "intermediate_size"}
    config.update(overrides)
    if registers:
        return _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=registers, **config)
    return _hf("Dinov2Model", "Dinov2Config", **config)


def _clip(cls="CLIPVisionModelWithProjection", **overrides):
    vision = dict(SMALL, intermediate_size=128, **overrides)
    if cls == "CLIPModel":
        return _hf(cls, "CLIPConfig", vision_config=vision, text_config=TEXT, projection_dim=32)
    return _hf(cls, "CLIPVisionConfig", projection_dim=32, **vision)


def _siglip(cls="SiglipVisionModel"):
    vision = dict(SMALL, intermediate_size=128)
    if cls == "SiglipModel":
        return _hf(cls, "SiglipConfig", vision_config=vision, text_config=TEXT)
    return _hf(cls, "SiglipVisionConfig", **vision)


def _x(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _post_layernorm(reference):
    return next(m for n, m in reference.named_modules() if n.endswith("post_layernorm"))


@torch.no_grad()
def _reference(reference, x) -> dict[str, torch.Tensor]:
    """Tokens after the final norm, pooled features and (where there is one) the projected embedding, each
    computed by transformers' own forward."""
    name = type(reference).__name__
    if name.startswith("Dinov2"):
        out = reference(pixel_values=x)
        return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}
    if name in ("CLIPModel", "SiglipModel"):
        vision = reference.vision_model(pixel_values=x)
        outputs = {"tokens": vision.last_hidden_state, "pooled": vision.pooler_output}
        if name == "CLIPModel":  # CLIP normalises only the pooled token: apply its post_layernorm to every token
            outputs["tokens"] = _post_layernorm(reference)(vision.last_hidden_state)
            embeds = reference.get_image_features(pixel_values=x)
            outputs["embeds"] = getattr(embeds, "pooler_output", embeds)  # transformers 5: an output object
        return outputs
    out = reference(pixel_values=x)
    if name.startswith("CLIP"):
        tokens = _post_layernorm(reference)(out.last_hidden_state)
        outputs = {"tokens": tokens, "pooled": tokens[:, 0]}
        if hasattr(out, "image_embeds"):
            outputs["embeds"] = out.image_embeds
        else:
            outputs["pooled_hf"] = out.pooler_output
        return outputs
    return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}  # SigLIP: post_layernorm on all tokens


@torch.no_grad()
def _assert_parity(ours, reference, x) -> dict[str, float]:
    expected = _reference(reference, x)
    ours.eval()
    tokens = ours.forward_features(x)
    pooled = ours.forward_head(tokens, pre_logits=True)
    got = {"tokens": tokens, "pooled": pooled, "pooled_hf": pooled, "embeds": ours(x)}
    differences = {}
    for what, theirs in expected.items():
        assert got[what].shape == theirs.shape, f"{what}: ours {tuple(got[what].shape)} vs {tuple(theirs.shape)}"
        assert theirs.std() > 1e-2, f"{what}: the reference is (nearly) constant; randomise its weights"
        differences[what] = (got[what] - theirs).abs().max().item()
        assert differences[what] <= TOL, f"{what}: max abs difference {differences[what]:.3g} > {TOL}"
    return differences


def _load(reference, tmp_path, **kwargs):
    reference.save_pretrained(tmp_path / "hf")
    return vit.load_pretrained(tmp_path / "hf", **kwargs)


# ---- import ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [
    {},
    {"use_swiglu_ffn": True},
    {"registers": 4, "patch_size": 14, "image_size": 28},
    {"registers": 4, "use_swiglu_ffn": True, "qkv_bias": False, "layer_norm_eps": 1e-5},
], ids=["dinov2", "swiglu", "registers-patch14", "registers-swiglu-nobias"])
def test_dinov2_loads_with_parity(tmp_path, variant):
    reference = _dinov2(**variant)
    model = _load(reference, tmp_path)
    registers = variant.get("registers", 0)
    config = model.config
    assert (config.reg_tokens, config.no_embed_class) == (registers, bool(registers))  # timm's reg4 layout
    assert config.init_values is not None
    assert config.mlp_layer == ("swiglu" if variant.get("use_swiglu_ffn") else "mlp")
    assert config.norm_eps == variant.get("layer_norm_eps", 1e-6)
    assert model.pretrained_cfg["format"] == "hf_dinov2"
    _assert_parity(model, reference, _x(variant.get("image_size", 32)))


@pytest.mark.parametrize("variant", [{"use_swiglu_ffn": True}, {"registers": 4, "use_swiglu_ffn": True}],
                         ids=["swiglu", "registers-swiglu"])
def test_dinov2_in_memory_state_dict_with_transformers5_names(variant):
    reference = _dinov2(**variant)  # q_proj/o_proj, gate_proj/up_proj/down_proj: what transformers 5 holds in memory
    assert any("gate_proj" in k for k in reference.state_dict())
    model = vit.load_pretrained(reference.state_dict(), model={"num_heads": 2})  # no config: shapes decide
    assert model.config.act_layer == "silu"
    _assert_parity(model, reference, _x())


@pytest.mark.parametrize("cls,act", [("CLIPVisionModel", "quick_gelu"), ("CLIPVisionModelWithProjection", "gelu")])
def test_clip_vision_loads_with_parity(tmp_path, cls, act):
    reference = _clip(cls, hidden_act=act)
    model = _load(reference, tmp_path)
    assert (model.config.pre_norm, model.config.act_layer, model.config.norm_eps) == (True, act, 1e-5)
    assert model.num_classes == (32 if cls.endswith("Projection") else 0)  # the projection is the head
    _assert_parity(model, reference, _x())


def test_clip_model_loads_the_vision_tower_only(tmp_path, caplog):
    reference = _clip("CLIPModel")
    with caplog.at_level(logging.INFO, logger="vit.checkpoints"):
        model = _load(reference, tmp_path)
    assert "ignored" in caplog.text and "text_model" in caplog.text and "logit_scale" in caplog.text
    assert model.pretrained_cfg["format"] == "hf_clip" and model.num_classes == 32
    _assert_parity(model, reference, _x())


def test_siglip_vision_loads_with_parity(tmp_path):
    reference = _siglip()
    model = _load(reference, tmp_path)
    config = model.config
    assert (config.class_token, config.global_pool, config.act_layer) == (False, "map", "gelu_tanh")
    _assert_parity(model, reference, _x())


def test_siglip_model_loads_the_vision_tower_only(tmp_path, caplog):
    reference = _siglip("SiglipModel")
    with caplog.at_level(logging.INFO, logger="vit.checkpoints"):
        model = _load(reference, tmp_path)
    assert "ignored" in caplog.text and "logit_bias" in caplog.text and "text_model" in caplog.text
    assert model.pretrained_cfg["format"] == "hf_siglip"
    _assert_parity(model, reference, _x())


def test_each_layout_is_detected_and_plain_hf_vit_still_is():
    cases = {"hf_dinov2": _dinov2(), "hf_clip": _clip("CLIPModel"), "hf_siglip": _siglip("SiglipModel")}
    cases["hf"] = transformers.ViTModel(transformers.ViTConfig(**SMALL, intermediate_size=128))
    for expected, reference in cases.items():
        assert detect_format(reference.state_dict())[0] == expected


# ---- preprocessing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,build,mean,std,crop_pct", [
    ("dinov2", _dinov2, IMAGENET_MEAN, IMAGENET_STD, 0.875),
    ("clip", _clip, CLIP_MEAN, CLIP_STD, 1.0),
    ("siglip", _siglip, [0.5] * 3, [0.5] * 3, 1.0),
])
def test_pretrained_cfg_has_each_familys_preprocessing(tmp_path, family, build, mean, std, crop_pct):
    reference = build()
    model = _load(reference, tmp_path)
    cfg = model.pretrained_cfg
    assert (cfg["mean"], cfg["std"]) == (pytest.approx(mean), pytest.approx(std))
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["img_size"]) == ("bicubic", crop_pct, [32, 32])
    # a preprocessor_config.json wins over the family's defaults
    processor = transformers.BitImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=2,
                                               size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "hf")
    cfg = vit.load_pretrained(tmp_path / "hf").pretrained_cfg
    assert (cfg["mean"], cfg["std"]) == (pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.4, 0.5, 0.6]))
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 0.8)


# ---- export -------------------------------------------------------------------------------------------------------
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}
EXPORTS = {
    "dinov2": {"init_values": 1e-5, "act_layer": "gelu"},
    "dinov2-registers-swiglu": {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True,
                                "mlp_layer": "swiglu", "mlp_ratio": 5.5, "act_layer": "silu"},
    # registers with rows in the position table: the rows fold into HF's register tokens
    "registers-in-table": {"init_values": 1e-5, "reg_tokens": 2, "qkv_bias": False},
    "deit3-like": {"init_values": 1e-6, "no_embed_class": True},  # the class token's row is zero in HF's table
    "clip": {"pre_norm": True, "act_layer": "quick_gelu", "norm_eps": 1e-5, "num_classes": 32},
    "clip-no-projection": {"pre_norm": True, "act_layer": "gelu", "qkv_bias": False},
    "siglip": {"class_token": False, "global_pool": "map", "act_layer": "gelu_tanh"},
}
HF_CLASS = {"dinov2": "Dinov2Model", "dinov2-registers-swiglu": "Dinov2WithRegistersModel",
            "registers-in-table": "Dinov2WithRegistersModel", "deit3-like": "Dinov2Model",
            "clip": "CLIPVisionModelWithProjection", "clip-no-projection": "CLIPVisionModel",
            "siglip": "SiglipVisionModel"}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_parity(tmp_path, name):
    model = randomize_(vit.VisionTransformer(**{**TINY, **EXPORTS[name]})).eval()
    if model.config.pre_norm and model.num_classes:
        torch.nn.init.zeros_(model.head.bias)  # CLIP's projection has no bias
    arch = architecture_of(model)
    config = hf_module(model).config(arch)
    assert config["architectures"] == [HF_CLASS[name]]
    (tmp_path / "hf").mkdir()
    save_file(export_state_dict(model, "hf"), tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    reference, info = getattr(transformers, HF_CLASS[name]).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _assert_parity(model, reference.eval(), _x())
    _assert_parity(vit.load_pretrained(tmp_path / "hf"), reference, _x())  # and back again


@pytest.mark.parametrize("overrides,says", [
    ({"init_values": 1e-5, "num_classes": 10}, "Dinov2Model has no classifier"),
    ({"pre_norm": True, "num_classes": 10}, "visual_projection has no bias"),
    ({"class_token": False, "global_pool": "map", "num_classes": 10}, "SiglipVisionModel has no classifier"),
    ({"init_values": 1e-5, "mlp_layer": "swiglu", "mlp_ratio": 2.5, "act_layer": "silu"}, "no integer mlp_ratio"),
])
def test_export_refuses_what_the_hf_class_cannot_hold(overrides, says):
    model = randomize_(vit.VisionTransformer(**{**TINY, **overrides}))
    with pytest.raises(CheckpointError, match=says):
        export_state_dict(model, "hf")
