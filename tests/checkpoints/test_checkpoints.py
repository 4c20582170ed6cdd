"""Checkpoint import/export against the source libraries themselves: same tokens, pre-logits features and
logits (<= 1e-4) in fp32, with every parameter of the source model random (``randomize_``)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import timm
import torch
from conftest import assert_matches_reference, randomize_
from safetensors.torch import save_file

import vit
from vit.checkpoints import architecture_of, detect_format, hf
from vit.tasks.backbone import Backbone

TOL = 1e-4
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _timm(**overrides):
    torch.manual_seed(0)
    name = overrides.pop("name", "vit_tiny_patch16_224")
    return randomize_(timm.create_model(name, pretrained=False, **{**SMALL, **overrides})).eval()


def _x(height=32, width=32, seed=1):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _close(ours, theirs, x, pre_logits=True):
    assert_matches_reference(ours, theirs, x, TOL, pre_logits=pre_logits)


def _ours(**kwargs):
    """Our model with every parameter random: the source of the export round trips."""
    return randomize_(vit.VisionTransformer(**kwargs)).eval()


# ---- timm and DeiT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [
    {},
    {"global_pool": "avg"},
    {"class_token": False, "global_pool": "avg"},
    {"qkv_bias": False},
    {"img_size": (32, 48)},
    {"embed_dim": 48, "num_heads": 3, "mlp_ratio": 2.0, "depth": 1},
])
def test_timm_state_dict_gives_timm_logits(tmp_path, variant):
    reference = _timm(**variant)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    hints = {"num_heads": variant.get("num_heads", 2)}
    if "img_size" in variant:
        hints["img_size"] = variant["img_size"]  # a non-square grid is not recorded in a bare state dict
    model = vit.load_pretrained(tmp_path / "weights.pth", model=hints)
    height, width = variant.get("img_size", (32, 32))
    _close(model, reference, _x(height, width))
    assert model.pretrained_cfg["format"] == "timm"


def test_deit_distilled_gives_timm_logits(tmp_path):
    reference = _timm(name="deit_tiny_distilled_patch16_224")
    save_file(reference.state_dict(), tmp_path / "deit.safetensors")
    model = vit.load_pretrained(tmp_path / "deit.safetensors", model={"num_heads": 2})
    assert model.dist_token is not None and model.head_dist is not None
    _close(model, reference, _x())
    assert model.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])  # DeiT: ImageNet statistics


def test_deit_official_checkpoint_nests_the_state_dict(tmp_path):
    reference = _timm(name="deit_tiny_patch16_224")
    torch.save({"model": reference.state_dict(), "epoch": 300}, tmp_path / "deit_checkpoint.pth")
    _close(vit.load_pretrained(tmp_path / "deit_checkpoint.pth", model={"num_heads": 2}), reference, _x())


def test_wrapper_prefixes_are_stripped(tmp_path):
    reference = _timm()
    sd = {f"module._orig_mod.{k}": v for k, v in reference.state_dict().items()}
    torch.save(sd, tmp_path / "ddp_compiled.pt")
    _close(vit.load_pretrained(tmp_path / "ddp_compiled.pt", model={"num_heads": 2}), reference, _x())
    assert detect_format({"net.patch_embed.proj.weight": 0}) == ("timm", "net.")


def test_lightning_checkpoint(tmp_path):
    reference = _timm()
    names = [f"class_{i}" for i in range(10)]
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in reference.state_dict().items()},
                           "criterion.weight": torch.ones(10)},  # not the model's: ignored
            "hyper_parameters": {"class_names": names, "num_heads": 2, "lr": 1e-3},
            "datamodule_hyper_parameters": {"mean": [0.3] * 3, "std": [0.4] * 3, "crop_pct": 1.0},
            "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.6.0"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = vit.load_pretrained(tmp_path / "last.ckpt")  # heads come from the hyper-parameters
    _close(model, reference, _x())
    assert model.pretrained_cfg["class_names"] == names
    # evaluated as the run evaluated: its normalisation and crop (vit.deploy.predict, vit.commands.embed read these)
    assert (model.pretrained_cfg["mean"], model.pretrained_cfg["crop_pct"]) == ([0.3] * 3, 1.0)


def test_lightning_checkpoint_of_a_module_with_the_default_heads(tmp_path):
    from vit.tasks.classification import ImageClassifier
    torch.manual_seed(0)
    # neither arch nor num_heads given: the default architecture's 12 heads, which width 96 does not tell
    module = ImageClassifier(Backbone(img_size=32, patch_size=8, embed_dim=96, depth=1), num_classes=10)
    randomize_(module.model)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "run.ckpt")
    model = vit.load_pretrained(tmp_path / "run.ckpt").eval()
    assert model.blocks[0].attn.num_heads == module.model.blocks[0].attn.num_heads == 12
    with torch.no_grad():
        assert torch.equal(model(_x()), module.model.eval()(_x()))


def test_model_may_be_a_registered_name(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32).eval()
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = vit.load_pretrained(tmp_path / "w.safetensors", model="vit_tiny_patch16_224")  # 192 wide: 3 heads
    assert model.img_size == (224, 224) and model.num_classes == 3  # registry size, checkpoint's head
    assert torch.equal(model.blocks[11].mlp.fc2.weight, reference.blocks[11].mlp.fc2.weight)


def test_heads_of_a_standard_width_are_guessed_with_a_warning(tmp_path, caplog):
    reference = _timm(embed_dim=192, num_heads=3, depth=1)  # ViT-Ti's width: 3 heads, as the table says
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING, logger="vit.checkpoints"):
        model = vit.load_pretrained(tmp_path / "w.pth")
    assert "number of attention heads" in caplog.text and "assuming 3" in caplog.text
    assert model.blocks[0].attn.num_heads == 3
    _close(model, reference, _x())


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_heads_of_another_width_are_not_guessed(tmp_path, library):
    # 96 wide with 3 heads: a guess (1 head of 96) would load without complaint and give other logits
    reference = (_timm(embed_dim=96, num_heads=3) if library == "timm"
                 else _torchvision(hidden_dim=96, num_heads=3, mlp_dim=384))
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    with pytest.raises(vit.CheckpointError) as info:
        vit.load_pretrained(tmp_path / "w.pth")
    message = str(info.value)
    assert "w.pth" in message and "number of attention heads" in message and "embed_dim 96" in message
    assert "model={'num_heads': N}" in message and "--num-heads" in message and "registered name" in message
    for hints in ({"num_heads": 3}, vit.VisionTransformer(**{**SMALL, "embed_dim": 96, "num_heads": 3})):
        _close(vit.load_pretrained(tmp_path / "w.pth", model=hints), reference, _x())


# ---- torchvision ---------------------------------------------------------------------------------------------
def _torchvision(**overrides):
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    return randomize_(VisionTransformer(**{**args, **overrides})).eval()


def test_torchvision_gives_torchvision_logits(tmp_path):
    reference = _torchvision()
    torch.save(reference.state_dict(), tmp_path / "vit_tv.pth")
    model = vit.load_pretrained(tmp_path / "vit_tv.pth", model={"num_heads": 2})
    _close(model, reference, _x())
    assert model.pretrained_cfg["format"] == "torchvision"
    assert model.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_round_trip_to_torchvision():
    model = _ours(**SMALL, mlp_ratio=2.0)  # torchvision's mlp_dim=128
    reference = _torchvision()
    reference.load_state_dict(vit.export_state_dict(model, "torchvision"))
    _close(model, reference, _x())


def test_round_trip_to_torchvision_without_qkv_bias():
    model = _ours(**SMALL, mlp_ratio=2.0, qkv_bias=False)
    reference = _torchvision()
    reference.load_state_dict(vit.export_state_dict(model, "torchvision"))  # zero in_proj_bias
    _close(model, reference, _x())


# ---- Hugging Face --------------------------------------------------------------------------------------------
def _hf_vit(**overrides):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                  patch_size=8, id2label={i: f"label{i}" for i in range(10)})
    return randomize_(ViTForImageClassification(ViTConfig(**{**config, **overrides}))).eval()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_vit_gives_transformers_logits(tmp_path, qkv_bias):
    reference = _hf_vit(qkv_bias=qkv_bias)
    assert reference.config.layer_norm_eps == 1e-12 and reference.config.hidden_act == "gelu"
    reference.save_pretrained(tmp_path / "hf")
    model = vit.load_pretrained(tmp_path / "hf")  # heads, eps and labels come from config.json
    assert model.blocks[0].norm1.eps == 1e-12
    _close(model, reference, _x())
    assert model.pretrained_cfg["class_names"] == [f"label{i}" for i in range(10)]
    assert model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]


def test_hf_in_memory_names_of_transformers_5():
    reference = _hf_vit()
    model = vit.load_pretrained(reference.state_dict(), model={"num_heads": 2, "norm_eps": 1e-12})
    _close(model, reference, _x())


def test_hf_vit_model_without_head_gives_the_same_features(tmp_path):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    reference = randomize_(ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=128, image_size=32, patch_size=8)))
    reference.save_pretrained(tmp_path / "hf")  # a pooler, no classifier
    model = vit.load_pretrained(tmp_path / "hf").eval()
    assert model.num_classes == 0
    _close(model, reference, _x())  # last_hidden_state and its class token


def test_hf_deit_with_teacher(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
    torch.manual_seed(0)
    reference = randomize_(DeiTForImageClassificationWithTeacher(DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10))).eval()
    reference.save_pretrained(tmp_path / "deit")
    model = vit.load_pretrained(tmp_path / "deit")
    assert model.distilled
    _close(model, reference, _x())


def test_round_trip_to_hf(tmp_path):
    from transformers import ViTForImageClassification
    model = _ours(**SMALL, norm_eps=1e-12)
    (tmp_path / "out").mkdir()
    save_file(vit.export_state_dict(model, "hf"), tmp_path / "out" / "model.safetensors")
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf.config(architecture_of(model))))
    _close(model, ViTForImageClassification.from_pretrained(tmp_path / "out").eval(), _x())


def test_round_trip_to_hf_deit(tmp_path):
    from transformers import DeiTForImageClassificationWithTeacher
    model = _ours(**SMALL, distilled=True)
    (tmp_path / "out").mkdir()
    save_file(vit.export_state_dict(model, "hf"), tmp_path / "out" / "model.safetensors")
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf.config(architecture_of(model))))
    _close(model, DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "out").eval(), _x())


def test_round_trip_to_timm():
    for variant in ({}, {"global_pool": "avg"}, {"distilled": True}):
        model = _ours(**SMALL, **variant)
        name = "deit_tiny_distilled_patch16_224" if variant.get("distilled") else "vit_tiny_patch16_224"
        reference = _timm(name=name, **{k: v for k, v in variant.items() if k != "distilled"})
        reference.load_state_dict(vit.export_state_dict(model, "timm"))
        _close(model, reference, _x())


def test_export_refuses_what_the_target_cannot_represent():
    model = vit.VisionTransformer(**SMALL, global_pool="avg")
    for fmt in ("torchvision", "hf"):
        with pytest.raises(vit.CheckpointError, match="avg"):
            vit.export_state_dict(model, fmt)
    with pytest.raises(ValueError, match="format"):
        vit.export_state_dict(model, "onnx")


# ---- Google .npz ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("big_vision", [False, True])
def test_npz_matches_timms_own_loader(tmp_path, big_vision):
    from timm.models.vision_transformer import _load_weights
    source = _timm()
    arrays = vit.export_state_dict(vit.load_pretrained(source.state_dict(), model={"num_heads": 2}), "npz",
                                   big_vision=big_vision)
    assert ("Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in arrays) == big_vision
    assert ("Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel" in arrays) != big_vision
    np.savez(tmp_path / "vit.npz", **arrays)
    reference = _timm()
    torch.nn.init.zeros_(reference.head.weight)  # make sure timm's loader really overwrites everything we compare
    _load_weights(reference, str(tmp_path / "vit.npz"))
    model = vit.load_pretrained(tmp_path / "vit.npz")  # heads are read off the query kernel's shape
    assert model.blocks[0].attn.num_heads == 2
    _close(model, reference.eval(), _x())
    _close(model, source, _x())
    assert model.pretrained_cfg["format"] == "npz" and model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]


def test_npz_with_prefix(tmp_path):
    source = _timm()
    arrays = vit.export_state_dict(vit.load_pretrained(source.state_dict(), model={"num_heads": 2}), "npz")
    np.savez(tmp_path / "ckpt.npz", **{f"opt/target/{k}": v for k, v in arrays.items()}, **{"opt/state/step": 1})
    _close(vit.load_pretrained(tmp_path / "ckpt.npz"), source, _x())


# ---- adaptation: image size, patch size, head ----------------------------------------------------------------
def _smooth_pos_embed(model, grid):
    """Replace random position embeddings with a smooth 2-D field, so resampled values can be compared."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, grid[0]), torch.linspace(0, 1, grid[1]), indexing="ij")
    freqs = torch.arange(1, model.embed_dim + 1, dtype=torch.float32) / model.embed_dim
    field = torch.sin(3 * ys.reshape(-1, 1) * freqs + 2 * xs.reshape(-1, 1) * freqs.flip(0))
    with torch.no_grad():
        model.pos_embed[0, model.num_prefix_tokens:] = field


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_new_img_size_matches_timm_resample(tmp_path, interpolation):
    from timm.layers import resample_abs_pos_embed
    source = _timm()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = vit.load_pretrained(tmp_path / "w.safetensors", model={"num_heads": 2}, img_size=(48, 64),
                                interpolation=interpolation)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 8], num_prefix_tokens=1,
                                      interpolation=interpolation, antialias=True)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    assert model(_x(48, 64)).shape == (2, 10)
    assert model.pretrained_cfg["img_size"] == [48, 64]


def test_double_size_keeps_the_original_grid_values(tmp_path):
    source = _timm()
    _smooth_pos_embed(source, (4, 4))
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = vit.load_pretrained(tmp_path / "w.safetensors", model={"num_heads": 2}, img_size=64)
    assert model(_x(64, 64)).shape == (2, 10)
    new = model.pos_embed[0, 1:].detach().reshape(8, 8, -1).permute(2, 0, 1)
    back = torch.nn.functional.avg_pool2d(new[None], 2)[0].permute(1, 2, 0).reshape(16, -1)
    assert (back - source.pos_embed[0, 1:].detach()).abs().max() < 0.1
    assert torch.equal(model.pos_embed[0, 0], source.pos_embed[0, 0].detach())  # class token kept apart


def test_new_patch_size_resamples_the_kernel(tmp_path):
    from timm.layers import resample_patch_embed
    source = _timm()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = vit.load_pretrained(tmp_path / "w.safetensors", model={"num_heads": 2}, patch_size=4)
    expected = resample_patch_embed(source.patch_embed.proj.weight.detach(), [4, 4])
    assert torch.allclose(model.patch_embed.proj.weight, expected, atol=1e-5)
    assert model.pos_embed.shape == (1, 1 + 64, 64) and model(_x()).shape == (2, 10)


def test_given_model_gets_resampled_and_head_reset(tmp_path, caplog):
    source = _timm()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    target = vit.VisionTransformer(**{**SMALL, "img_size": 48, "num_classes": 5})
    with caplog.at_level(logging.INFO, logger="vit.checkpoints"):
        model = vit.load_pretrained(tmp_path / "w.safetensors", model=target)
    assert model is target and model.head.out_features == 5
    assert "re-initialised the classifier head" in caplog.text and "resampling position embeddings" in caplog.text
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_num_classes_zero_drops_the_head(tmp_path, caplog):
    reference = _hf_vit()
    reference.save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.INFO, logger="vit.checkpoints"):
        model = vit.load_pretrained(tmp_path / "hf", num_classes=0)
    assert isinstance(model.head, torch.nn.Identity) and "dropped the classifier head" in caplog.text
    assert model(_x()).shape == (2, 64)
    assert model.pretrained_cfg["class_names"] is None  # the names belonged to the dropped head


# ---- our own layout ------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_exactly(tmp_path):
    reference = _hf_vit()
    reference.save_pretrained(tmp_path / "hf")
    model = vit.load_pretrained(tmp_path / "hf", img_size=(32, 48))
    vit.save_pretrained(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architecture"]["img_size"] == [32, 48] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    again = vit.load_pretrained(tmp_path / "ours")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert architecture_of(again) == architecture_of(model)
    for key in ("class_names", "mean", "std", "img_size", "interpolation", "crop_pct", "num_classes"):
        assert again.pretrained_cfg[key] == model.pretrained_cfg[key], key
    assert again.pretrained_cfg["format"] == "vit"
    x = _x(32, 48)
    assert torch.equal(model.eval()(x), again.eval()(x))


def test_save_pretrained_arguments_win_and_are_checked(tmp_path):
    model = vit.VisionTransformer(**{**SMALL, "num_classes": 2}, global_pool="avg", class_token=False)
    vit.save_pretrained(model, tmp_path / "m", class_names=["cat", "dog"], mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    again = vit.load_pretrained(tmp_path / "m")
    assert again.pretrained_cfg["class_names"] == ["cat", "dog"] and again.pretrained_cfg["mean"] == [0.1, 0.2, 0.3]
    assert again.global_pool == "avg" and again.cls_token is None
    with pytest.raises(ValueError, match="class_names"):
        vit.save_pretrained(model, tmp_path / "bad", class_names=["one"])
