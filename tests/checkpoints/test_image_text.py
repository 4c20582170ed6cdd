"""Whole CLIP / SigLIP models against the libraries that define them: tiny reference models with every parameter
random (open_clip, transformers), saved to tmp_path and loaded by ``vit.load_image_text``; text features, image
features and image-text logits agree (<= 1e-4). The big_vision .npz text tower is checked against a numpy forward
pass written from big_vision's definition. Export goes back: the libraries load what we write."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import randomize_
from safetensors.torch import save_file

import vit
from vit.checkpoints import CheckpointError, export_image_text, image_text_hf_config, npz

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

TOL = 1e-4
OC_TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
OC_VISION = dict(layers=1, width=64, head_width=32, patch_size=8, image_size=32)
HF_VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
             "intermediate_size": 64}
HF_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "vocab_size": 64, "max_position_embeddings": 12, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _images(seed=1):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ids(vocab, length, eos=None, rows=3, seed=2):
    ids = torch.randint(3, vocab - 1, (rows, length), generator=torch.Generator().manual_seed(seed))
    if eos is not None:  # each row ends its text somewhere before the end
        for i, end in enumerate(range(2, 2 + rows)):
            ids[i, end] = eos
    return ids


def _close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    assert theirs.std() > 1e-2, f"{what}: the reference is (nearly) constant"
    difference = (ours - theirs).abs().max().item()
    assert difference <= TOL, f"{what}: max abs difference {difference:.3g} > {TOL}"


# ---- open_clip ---------------------------------------------------------------------------------------------------
def _open_clip(quick_gelu):
    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**OC_VISION), text_cfg=CLIPTextCfg(**OC_TEXT),
                 quick_gelu=quick_gelu)
    return randomize_(model, std=0.3).eval()


@torch.no_grad()
def _assert_open_clip_parity(model, reference):
    ids, images = _ids(50, 8), _images()
    _close(model.encode_text(ids), reference.encode_text(ids), "text features")
    _close(model.encode_image(images), reference.encode_image(images), "image features")
    image_features, text_features, scale = model(images, ids)
    theirs = reference(images, ids)
    _close(scale * image_features @ text_features.T, theirs[2] * theirs[0] @ theirs[1].T, "logits")


def test_openai_style_quickgelu_state_dict(tmp_path):
    reference = _open_clip(quick_gelu=True)
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    model = vit.load_image_text(tmp_path / "clip.pt", quick_gelu=True, vision={"num_heads": 2},
                                text={"num_heads": 2})
    assert model.text.config.act_layer == model.visual.config.act_layer == "quick_gelu"
    assert (model.text.config.causal, model.text.config.pool) == (True, "argmax")
    assert model.logit_bias is None and model.tokenizer is None  # vocab 50 is not OpenAI's: no tokenizer to assume
    _assert_open_clip_parity(model, reference)


def test_open_clip_directory_needs_no_hints(tmp_path):
    reference = _open_clip(quick_gelu=False)
    config = {"model_cfg": {"embed_dim": 16, "quick_gelu": False, "vision_cfg": OC_VISION, "text_cfg": OC_TEXT},
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(reference.state_dict(), tmp_path / "open_clip_model.safetensors")
    model = vit.load_image_text(tmp_path)
    assert model.text.config.act_layer == "gelu" and model.text.config.num_heads == 2
    assert model.pretrained_cfg["mean"] == [0.5] * 3
    assert vit.load_image_text(tmp_path, tokenizer="openclip").tokenizer(["a cat"]).shape == (1, 8)  # the context
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        model.encode_text(torch.tensor([[49406, 320, 49407]]))
    _assert_open_clip_parity(model, reference)
    # and back: open_clip loads the export strictly and agrees
    again = _open_clip(quick_gelu=False)
    again.load_state_dict(export_image_text(model, "openclip"), strict=True)
    _assert_open_clip_parity(model, again.eval())


def test_open_clip_siglip_style_custom_text_tower(tmp_path):
    """open_clip's SigLIP layout: CustomTextCLIP (text keys under ``text.``), bidirectional, last-token pooling, a
    projection with a bias, and a logit_bias."""
    from open_clip.model import CustomTextCLIP
    text_cfg = {**OC_TEXT, "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}}  # as SigLIP 2's configs
    torch.manual_seed(0)
    reference = randomize_(CustomTextCLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**OC_VISION),
                                          text_cfg=CLIPTextCfg(**text_cfg), init_logit_bias=-10.0), std=0.3).eval()
    assert any(k.startswith("text.") for k in reference.state_dict())
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": OC_VISION, "text_cfg": text_cfg}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = vit.load_image_text(tmp_path)
    text = model.text.config
    assert (text.causal, text.pool, text.proj_bias, text.norm_eps, text.act_layer) == (False, "last", True, 1e-6,
                                                                                        "gelu_tanh")
    _assert_open_clip_parity(model, reference)
    ids, images = _ids(50, 8), _images()
    with torch.no_grad():
        image_features, text_features, scale, bias = reference(images, ids)
        _close(model.logits(images, ids)[0], scale * image_features @ text_features.T + bias, "logits with bias")


# ---- transformers --------------------------------------------------------------------------------------------------
def _hf(kind, **text):
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config={**HF_TEXT, **text}, vision_config=HF_VISION, projection_dim=24)
        return randomize_(transformers.CLIPModel(config), std=0.3).eval()
    config = transformers.SiglipConfig(text_config={**HF_TEXT, **text}, vision_config=HF_VISION)
    return randomize_(transformers.SiglipModel(config), std=0.3).eval()


@torch.no_grad()
def _assert_hf_parity(model, reference, ids):
    images = _images()
    _close(model.encode_text(ids), reference.get_text_features(input_ids=ids).pooler_output, "text features")
    _close(model.encode_image(images), reference.get_image_features(pixel_values=images).pooler_output,
           "image features")
    _close(model.logits(images, ids)[0], reference(input_ids=ids, pixel_values=images).logits_per_image,
           "logits_per_image")


@pytest.mark.parametrize("eos", [2, 60], ids=["argmax-legacy-eos", "first-eos"])
def test_hf_clip_model(tmp_path, eos):
    reference = _hf("clip", eos_token_id=eos)
    reference.save_pretrained(tmp_path / "clip")
    model = vit.load_image_text(tmp_path / "clip", tokenizer=lambda texts: torch.zeros(len(texts), 12).long())
    assert model.text.config.pool == ("argmax" if eos == 2 else "eos")
    _assert_hf_parity(model, reference, _ids(64, 12, eos=60))
    # export: transformers reads our files and agrees
    vit.save_image_text(model, tmp_path / "export")
    again = transformers.CLIPModel.from_pretrained(tmp_path / "export").eval()
    _assert_hf_parity(model, again, _ids(64, 12, eos=60))


def test_hf_siglip_model(tmp_path):
    reference = _hf("siglip")
    reference.save_pretrained(tmp_path / "siglip")
    model = vit.load_image_text(tmp_path / "siglip")
    assert (model.text.config.causal, model.text.config.pool, model.text.config.act_layer) == (False, "last",
                                                                                                "gelu_tanh")
    assert model.logit_bias is not None and model.tokenizer is None  # no tokenizer files were saved
    ids = _ids(64, 12)
    _assert_hf_parity(model, reference, ids)
    sigmoid = torch.sigmoid(model.logits(_images(), ids)[0])
    assert sigmoid.shape == (2, 3)
    vit.save_image_text(model, tmp_path / "export")
    assert image_text_hf_config(model)["architectures"] == ["SiglipModel"]
    _assert_hf_parity(model, transformers.SiglipModel.from_pretrained(tmp_path / "export").eval(), ids)


# ---- big_vision .npz -------------------------------------------------------------------------------------------------
def _layer_norm(x, scale, bias, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):  # flax.linen.gelu's default (approximate=True)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _big_vision_text(arrays, ids, depth):
    """big_vision's text tower (models/proj/image_text/text_transformer.py, encoder from models/vit.py) in numpy:
    embed, add positions, pre-norm blocks (Flax multi-head attention with its head axis kept), final norm, last
    token, head."""
    p = {k[len("params/txt/"):]: v.astype(np.float64) for k, v in arrays.items() if k.startswith("params/txt/")}
    x = p["Embed_0/embedding"][ids] + p["pos_embedding"][0, :ids.shape[1]]
    for i in range(depth):
        b = f"Encoder_0/encoderblock_{i}/"
        y = _layer_norm(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
        att = b + "MultiHeadDotProductAttention_0/"
        q, k, v = (np.einsum("bld,dhk->blhk", y, p[att + f"{n}/kernel"]) + p[att + f"{n}/bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = np.einsum("bhqs,bshk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", y, p[att + "out/kernel"]) + p[att + "out/bias"]
        y = _layer_norm(x, p[b + "LayerNorm_1/scale"], p[b + "LayerNorm_1/bias"])
        mlp = b + "MlpBlock_0/"
        y = _gelu_tanh(y @ p[mlp + "Dense_0/kernel"] + p[mlp + "Dense_0/bias"])
        x = x + y @ p[mlp + "Dense_1/kernel"] + p[mlp + "Dense_1/bias"]
    x = _layer_norm(x, p["Encoder_0/encoder_norm/scale"], p["Encoder_0/encoder_norm/bias"])
    return x[:, -1] @ p["head/kernel"] + p["head/bias"]


def _siglip_npz(path, depth=2, width=32, heads=2, vocab=40, length=10):
    rng = np.random.default_rng(0)
    image = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=width, depth=1, num_heads=heads, num_classes=0,
                                  class_token=False, global_pool="map", act_layer="gelu_tanh")
    randomize_(image, std=0.3)
    arrays = {"params/img/" + k: v for k, v in npz.from_timm(image.state_dict(), {"num_heads": heads}).items()}

    def r(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    txt = {"Embed_0/embedding": r(vocab, width), "pos_embedding": r(1, length, width),
           "Encoder_0/encoder_norm/scale": r(width), "Encoder_0/encoder_norm/bias": r(width),
           "head/kernel": r(width, width), "head/bias": r(width)}
    for i in range(depth):
        b = f"Encoder_0/encoderblock_{i}/"
        for n in ("LayerNorm_0", "LayerNorm_1"):
            txt[b + n + "/scale"], txt[b + n + "/bias"] = r(width), r(width)
        for n in ("query", "key", "value"):
            txt[b + f"MultiHeadDotProductAttention_0/{n}/kernel"] = r(width, heads, width // heads)
            txt[b + f"MultiHeadDotProductAttention_0/{n}/bias"] = r(heads, width // heads)
        txt[b + "MultiHeadDotProductAttention_0/out/kernel"] = r(heads, width // heads, width)
        txt[b + "MultiHeadDotProductAttention_0/out/bias"] = r(width)
        txt[b + "MlpBlock_0/Dense_0/kernel"], txt[b + "MlpBlock_0/Dense_0/bias"] = r(width, 4 * width), r(4 * width)
        txt[b + "MlpBlock_0/Dense_1/kernel"], txt[b + "MlpBlock_0/Dense_1/bias"] = r(4 * width, width), r(width)
    arrays.update({"params/txt/" + k: v for k, v in txt.items()})
    arrays["params/t"], arrays["params/b"] = np.array([2.3], np.float32), np.array([-10.0], np.float32)
    np.savez(path, **arrays)
    return arrays, image


def test_big_vision_npz_text_tower(tmp_path):
    arrays, image = _siglip_npz(tmp_path / "siglip.npz")
    model = vit.load_image_text(tmp_path / "siglip.npz")
    assert (model.text.config.num_heads, model.text.config.pool, model.text.config.causal) == (2, "last", False)
    assert model.logit_scale.item() == pytest.approx(2.3) and model.logit_bias.item() == pytest.approx(-10.0)
    ids = _ids(40, 10).numpy()
    expected = torch.from_numpy(_big_vision_text(arrays, ids, depth=2)).float()
    with torch.no_grad():
        _close(model.encode_text(torch.from_numpy(ids)), expected, "text features")
        _close(model.encode_image(_images()), image.eval()(_images()), "image features")


# ---- what is not there -------------------------------------------------------------------------------------------
def test_image_tower_only_is_refused_naming_what_is_missing(tmp_path):
    clip = _open_clip(quick_gelu=False)
    save_file(clip.visual.state_dict(), tmp_path / "visual.safetensors")
    with pytest.raises(CheckpointError, match=r"image tower only \(openclip format\); no text tower.*token_embedding"):
        vit.load_image_text(tmp_path / "visual.safetensors")
    with pytest.raises(CheckpointError, match="neither a known image tower nor a text tower"):
        vit.load_image_text({"something.weight": torch.zeros(2)})


def test_broken_text_tower_names_the_keys():
    state = _open_clip(quick_gelu=False).state_dict()
    del state["ln_final.weight"]
    with pytest.raises(CheckpointError, match=r"(?s)text tower.*missing keys \(1\): norm.weight"):
        vit.load_image_text(state, vision={"num_heads": 2}, text={"num_heads": 2})
