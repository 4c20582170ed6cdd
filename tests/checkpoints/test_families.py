"""Today's families in timm's layout: files and hub repos written by timm itself load with no hints and give
timm's outputs; `create_model(name, pretrained=True)` resolves them offline; the CLI fine-tunes each."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_loss_fell, assert_matches_reference, logged_losses, randomize_, write_image_folder
from test_checkpoints_hub import _put_in_cache, _timm_hub_files

import vit
from vit.training.cli import cli

TINY = dict(embed_dim=64, depth=2, num_heads=2)
# name: (image size of the tiny model, normalisation its weights expect)
FAMILIES = {
    "vit_small_patch14_dinov2": (28, (0.485, 0.456, 0.406)),
    "vit_small_patch14_reg4_dinov2": (28, (0.485, 0.456, 0.406)),
    "deit3_small_patch16_224": (32, (0.485, 0.456, 0.406)),
    "vit_base_patch16_clip_quickgelu_224": (32, (0.48145466, 0.4578275, 0.40821073)),
    "vit_base_patch16_siglip_224": (32, (0.5, 0.5, 0.5)),
    "vit_large_patch16_siglip_512": (32, (0.5, 0.5, 0.5)),  # SigLIP 2 shape: tanh GELU
}


def _timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    size = FAMILIES[name][0]
    return randomize_(timm.create_model(name, pretrained=False, img_size=size, **TINY)).eval()


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_directory_of_each_family_loads_with_no_hints(name, tmp_path):
    from timm.models._hub import save_for_hf
    reference = _timm_model(name)
    save_for_hf(reference, tmp_path / "repo", safe_serialization=True)  # config.json: architecture + model_args
    model = vit.load_pretrained(tmp_path / "repo")
    assert_matches_reference(model, reference, _x(FAMILIES[name][0]))
    assert model.pretrained_cfg["mean"] == pytest.approx(list(FAMILIES[name][1]))
    # what only the name tells: QuickGELU for OpenAI CLIP, tanh GELU for SigLIP 2 shapes
    assert model.config.act_layer == vit.models.registry.model_config(name).act_layer


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_quickgelu_224",
                                  "vit_base_patch16_siglip_224"])
def test_create_model_pretrained_resolves_the_default_tag_offline(name, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = _timm_model(name)
    _put_in_cache(cache, vit.models.registry.WEIGHTS[name].removeprefix("hf-hub:"), _timm_hub_files(reference))
    size = FAMILIES[name][0]
    model = vit.create_model(name, pretrained=True, img_size=size, **TINY)
    assert_matches_reference(model, reference, _x(size))  # the checkpoint's head (or none) is kept


def test_a_timm_tag_in_the_name_picks_other_weights(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    mae = randomize_(timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, num_classes=0,
                                       **TINY)).eval()
    _put_in_cache(cache, "timm/vit_base_patch16_224.mae", _timm_hub_files(mae))
    model = vit.create_model("vit_base_patch16_224.mae", pretrained=True, img_size=32, **TINY)
    assert model.num_classes == 0 and model.pretrained_cfg["source"] == "hf-hub:timm/vit_base_patch16_224.mae"
    assert_matches_reference(model, mae, _x(32))
    with pytest.raises(ValueError, match="no pretrained weights are registered"):
        vit.create_model("vit_tiny_patch8_224", pretrained=True)


# full.yaml's fine-tune, made to show learning on 12 images in a few seconds: no mixing or augmentation, every step
# logged, several epochs (its early stopping needs val/acc to stall for 10 of them)
LEARN = ["--trainer.max_epochs", "8", "--trainer.log_every_n_steps", "1", "--model.lr", "0.005",
         "--model.mixup_alpha", "0", "--model.cutmix_alpha", "0", "--data.augment", "none", "--data.random_erasing",
         "0", "--model.warmup_epochs", "0", "--model.ema_decay", "null", "--model.backbone.drop_path_rate", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_quickgelu_224",
                                  "vit_base_patch16_siglip_224", "deit3_small_patch16_224"])
def test_cli_fine_tunes_each_family(name, tmp_path, monkeypatch):
    from timm.models._hub import save_for_hf
    reference = _timm_model(name)
    save_for_hf(reference, tmp_path / "weights", safe_serialization=True)
    images = write_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=4, size=40)
    monkeypatch.chdir(tmp_path)
    size = 42 if "patch14" in name else 48  # not the weights' size: the position grid is resampled
    app = cli(["fit", "--config", str(vit.training.cli.DEFAULT_CONFIG.parent / "finetune" / "full.yaml"),
               "--data.root", str(images), "--data.img_size", str(size), "--data.batch_size", "4",
               "--data.num_workers", "0", "--model.backbone.pretrained", str(tmp_path / "weights"),
               "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               *LEARN])
    model = app.model.model
    want = vit.models.registry.model_config(name)
    assert model.num_classes == 3 and model.img_size == (size, size)  # new head, position grid resampled
    assert (model.config.act_layer, model.config.global_pool, model.config.reg_tokens) == \
        (want.act_layer, want.global_pool, want.reg_tokens)
    assert app.datamodule.mean == pytest.approx(FAMILIES[name][1])  # the weights' normalisation
    assert app.trainer.global_step > 0 and torch.isfinite(app.trainer.callback_metrics["val/loss"])
    assert_loss_fell(logged_losses(app))  # the fine-tune learns (a bright square per class)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2-registers", "clip-model", "siglip"])
def test_cli_fine_tunes_hugging_face_checkpoints(family, tmp_path, monkeypatch):
    from test_checkpoints_hf_families import _clip, _dinov2, _siglip
    reference = {"dinov2-registers": lambda: _dinov2(registers=4), "clip-model": lambda: _clip("CLIPModel"),
                 "siglip": _siglip}[family]()
    reference.save_pretrained(tmp_path / "weights")
    images = write_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=4, size=40)
    monkeypatch.chdir(tmp_path)
    app = cli(["fit", "--config", str(vit.training.cli.DEFAULT_CONFIG.parent / "finetune" / "full.yaml"),
               "--data.root", str(images), "--data.img_size", "40", "--data.batch_size", "4",
               "--data.num_workers", "0", "--model.backbone.pretrained", str(tmp_path / "weights"),
               "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               *LEARN])
    model = app.model.model
    assert model.num_classes == 3 and model.img_size == (40, 40)  # 4x4 grid resampled to 5x5, new head
    expected_mean = {"dinov2-registers": 0.485, "clip-model": 0.48145466, "siglip": 0.5}[family]
    assert app.datamodule.mean[0] == pytest.approx(expected_mean)
    assert app.trainer.global_step > 0 and torch.isfinite(app.trainer.callback_metrics["val/loss"])
    assert_loss_fell(logged_losses(app))  # the fine-tune learns (a bright square per class)
