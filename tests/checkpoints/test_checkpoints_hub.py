"""Hub names resolved offline from a pre-populated huggingface_hub cache, and the conversion CLI."""
from __future__ import annotations

import json
import runpy
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import assert_matches_reference, randomize_
from safetensors.torch import save_file

import vit
from vit.commands.convert import main

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _put_in_cache(cache, repo, files: dict):
    """Lay files out as huggingface_hub does: models--ORG--REPO/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def _timm_hub_files(model):
    from timm.models._hub import save_config_for_hf
    return {"model.safetensors": lambda p: save_file(model.state_dict(), p),
            "config.json": lambda p: save_config_for_hf(model, p)}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _x(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hf_hub_and_timm_names_load_from_the_offline_cache(offline_cache):
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)).eval()
    _put_in_cache(offline_cache, REPO, _timm_hub_files(reference))
    for name in (f"hf-hub:{REPO}", "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        model = vit.load_pretrained(name)  # heads and sizes come from timm's config.json
        assert_matches_reference(model, reference, _x())
        assert model.pretrained_cfg["source"] == name and model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]


def test_hf_hub_transformers_repo_from_the_offline_cache(offline_cache):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    reference = randomize_(ViTForImageClassification(ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8))).eval()
    saved = offline_cache.parent / "hf_saved"
    reference.save_pretrained(saved)
    preprocessor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}
    _put_in_cache(offline_cache, "google/vit-tiny-test", {
        "model.safetensors": lambda p: p.write_bytes((saved / "model.safetensors").read_bytes()),
        "config.json": lambda p: p.write_bytes((saved / "config.json").read_bytes()),
        "preprocessor_config.json": lambda p: p.write_text(json.dumps(preprocessor))})
    model = vit.load_pretrained("hf-hub:google/vit-tiny-test")
    assert_matches_reference(model, reference, _x())
    assert model.pretrained_cfg["interpolation"] == "bilinear"


def test_create_model_pretrained_uses_the_cache(offline_cache):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)  # full width, 2 blocks
    _put_in_cache(offline_cache, REPO, _timm_hub_files(reference))
    # the registry's depth is 12; a 2-block file does not fit and says so
    with pytest.raises(vit.CheckpointError, match="missing keys"):
        vit.create_model("vit_tiny_patch16_224", pretrained=True)
    model = vit.create_model("vit_tiny_patch16_224", pretrained=True, depth=2, num_classes=5, img_size=64)
    assert model.head.out_features == 5 and model.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(model.blocks[1].attn.qkv.weight, reference.blocks[1].attn.qkv.weight)


def test_missing_cache_says_which_file_and_how_to_pass_a_path(offline_cache):
    with pytest.raises(vit.CheckpointError) as info:
        vit.load_pretrained("hf-hub:google/vit-base-patch16-224")
    message = str(info.value)
    assert "model.safetensors" in message and "google/vit-base-patch16-224" in message
    assert "HF_HUB_OFFLINE" in message and "local path" in message and str(offline_cache) in message
    with pytest.raises(vit.CheckpointError, match="timm knows no hub weights"):
        vit.load_pretrained("timm:not_a_model.tag")
    with pytest.raises(vit.CheckpointError, match="ORG/REPO"):
        vit.load_pretrained("hf-hub:no-slash")


# ---- vit convert -----------------------------------------------------------------------------------
def _sources(tmp_path):
    """One file per source library, every parameter random: {file: (detected format, the options it needs, the
    source model whose outputs the converted one must give)}."""
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL), seed=1).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    deit = randomize_(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **SMALL), seed=2).eval()
    save_file(deit.state_dict(), tmp_path / "deit.safetensors")
    tv = randomize_(TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                                   num_classes=10), seed=3).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    hf = randomize_(ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=128, image_size=32, patch_size=8)),
                    seed=4).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = vit.load_pretrained(reference.state_dict(), model={"num_heads": 2})
    np.savez(tmp_path / "google.npz", **vit.export_state_dict(model, "npz"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()},
                "hyper_parameters": {"num_heads": 2, "class_names": list("abcdefghij")}}, tmp_path / "run.ckpt")
    heads = ["--num-heads", "2"]
    return {"timm.pth": ("timm", heads, reference), "deit.safetensors": ("timm", heads, deit),
            "tv.pth": ("torchvision", heads, tv), "hf": ("hf", [], hf), "google.npz": ("npz", [], reference),
            "run.ckpt": ("timm", [], reference)}


def test_cli_converts_each_source(tmp_path, capsys):
    for name, (fmt, extra, reference) in _sources(tmp_path).items():
        # as it is: the converted model gives the source model's outputs (tokens, pre-logits features, logits)
        same = tmp_path / f"same_{name}"
        assert main([str(tmp_path / name), str(same), *extra]) == 0
        printed = capsys.readouterr().out
        assert f"detected: {fmt} checkpoint" in printed and "embed_dim=64" in printed, printed
        converted = vit.load_pretrained(same)
        assert converted.img_size == (32, 32)
        assert_matches_reference(converted, reference, _x())  # the logits' shape too: the source's classes
        # at another size, for other classes: position embeddings resampled, a new head, the rest as converted
        out = tmp_path / f"out_{name}"
        assert main([str(tmp_path / name), str(out), "--img-size", "48", "--num-classes", "3", *extra]) == 0
        printed = capsys.readouterr().out
        assert f"detected: {fmt} checkpoint" in printed and "embed_dim=64" in printed, printed
        model = vit.load_pretrained(out).eval()
        assert model.img_size == (48, 48) and model.num_classes == 3
        assert (out / "config.json").exists() and (out / "model.safetensors").exists()
        # its features at 48 px: those of the model converted as it is, resampling its position embeddings on the fly
        dynamic = vit.VisionTransformer(converted.config.replace(dynamic_img_size=True)).eval()
        dynamic.load_state_dict(converted.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(_x(48)), dynamic.forward_features(_x(48)),
                                       atol=1e-4, rtol=0)
    # a bare state dict of a non-standard width (64) without --num-heads: refused, and told how to pass it
    assert main([str(tmp_path / "timm.pth"), str(tmp_path / "out_no_heads")]) == 2
    err = capsys.readouterr().err
    assert "number of attention heads" in err and "--num-heads N" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: vit.commands.convert is already imported
def test_cli_error_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "junk.pth").write_bytes(b"junk" * 10)
    assert main([str(tmp_path / "junk.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "junk.pth" in err and "\n" not in err
    # `python -m vit convert`, run in-process (a subprocess would pay the imports again)
    monkeypatch.setattr(sys, "argv", ["vit", "convert", str(tmp_path / "missing.pth"), str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("vit", run_name="__main__")
    assert info.value.code == 2 and "no such file" in capsys.readouterr().err


def test_cli_takes_the_activation_a_bare_clip_file_cannot_tell(tmp_path, capsys):
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False,
                                             **SMALL)).eval()
    save_file(reference.state_dict(), tmp_path / "clip.safetensors")  # weights only: no name, no config
    args = [str(tmp_path / "clip.safetensors"), str(tmp_path / "out"), "--num-heads", "2"]
    assert main([*args, "--act-layer", "quick_gelu"]) == 0
    printed = capsys.readouterr().out
    assert "act_layer=quick_gelu" in printed and "pre_norm=True" in printed
    assert_matches_reference(vit.load_pretrained(tmp_path / "out"), reference, _x())
