"""Fine-tuning: pretrained loading, layer-wise LR decay, freezing, Mixup/CutMix, EMA, recipes — and the proof
that fine-tuning a pretrained tiny ViT beats training the same model from scratch."""
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import vit
from vit.data import ImageDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ImageClassifier, freeze_layers, mix_batch
from vit.training.cli import cli
from vit.training.optim import param_groups

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "finetune"


def _trainer(tmp_path, **kwargs):
    defaults = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    return L.Trainer(**{**defaults, **kwargs})


def write_digits(root: Path, digits, per_class_train: int, per_class_val: int, seed: int = 0) -> Path:
    """An image folder of scikit-learn's 8x8 digits (PNG), classes digit<d>."""
    from vit.data.datasets import load_digits_arrays
    images, labels = load_digits_arrays(3)
    rng = np.random.default_rng(seed)
    for d in digits:
        idx = rng.permutation(np.flatnonzero(labels == d))
        for split, chosen in (("train", idx[:per_class_train]),
                              ("val", idx[per_class_train:per_class_train + per_class_val])):
            folder = root / split / f"digit{d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


@pytest.fixture
def pretrained_dir(tmp_path):
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=16, num_classes=7, **TINY)
    return vit.save_pretrained(model, tmp_path / "pre", class_names=[f"c{i}" for i in range(7)],
                               mean=[0.25, 0.5, 0.75], std=[0.2, 0.3, 0.4])


@pytest.mark.slow
def test_finetuning_a_pretrained_model_beats_training_from_scratch(tmp_path):
    # Task A: digits 0-4 at 16 px. Task B: digits 5-9 (other labels) at 24 px, 20 training images per class.
    arch = dict(patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
    task_a = write_digits(tmp_path / "a", range(5), 120, 10)
    task_b = write_digits(tmp_path / "b", range(5, 10), 20, 30, seed=1)
    L.seed_everything(0)
    dm = ImageDataModule("imagefolder", root=str(task_a), img_size=16, batch_size=32, augment="none",
                         mean=[0.5], std=[0.5])
    pre = ImageClassifier(Backbone(img_size=16, **arch), num_classes=5, lr=3e-3, warmup_epochs=0)
    _trainer(tmp_path, max_epochs=15).fit(pre, datamodule=dm)
    pre_acc = _trainer(tmp_path).validate(pre, datamodule=dm, verbose=False)[0]["val/acc"]
    vit.save_pretrained(pre.model, tmp_path / "pre", class_names=dm.class_names, mean=[0.5] * 3, std=[0.5] * 3)

    acc = {}
    for name, kwargs in (("scratch", arch), ("finetuned", dict(pretrained=str(tmp_path / "pre")))):
        L.seed_everything(1)
        dm_b = ImageDataModule("imagefolder", root=str(task_b), img_size=24, batch_size=16, augment="none",
                               mean=[0.5], std=[0.5])
        module = ImageClassifier(Backbone(img_size=24, **kwargs), num_classes=5, lr=3e-3, warmup_epochs=0)
        trainer = _trainer(tmp_path, max_epochs=15)
        trainer.fit(module, datamodule=dm_b)
        acc[name] = trainer.validate(module, datamodule=dm_b, verbose=False)[0]["val/acc"]
        assert module.model.img_size == (24, 24) and module.model.num_classes == 5
    print(f"pretrain val acc {pre_acc:.3f}; task B after {trainer.global_step} steps: {acc}")
    assert pre_acc > 0.8
    assert acc["finetuned"] > acc["scratch"] + 0.05, acc


def test_pretrained_weights_load_in_init_with_new_head_and_size(pretrained_dir, tmp_path):
    source = vit.load_pretrained(pretrained_dir)
    module = ImageClassifier(Backbone(pretrained=str(pretrained_dir), img_size=24, drop_path_rate=0.1), num_classes=3)
    model = module.model
    assert model.num_classes == 3 and model.img_size == (24, 24) and model.pos_embed.shape[1] == 1 + 36
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.pretrained_cfg["mean"] == [0.25, 0.5, 0.75]
    # the .ckpt records the loaded architecture, so it reloads without the pretrained files
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    dm = ImageDataModule("digits", img_size=24, batch_size=8)
    module = ImageClassifier(Backbone(pretrained=str(pretrained_dir), img_size=24), num_classes=10)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    for f in pretrained_dir.iterdir():
        f.unlink()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ft.ckpt", weights_only=False).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(restored(x), module.eval()(x))


def test_layer_decay_groups_every_parameter_once_with_lr_per_depth(tmp_path):
    module = ImageClassifier(Backbone(img_size=16, layer_decay=0.5, **TINY), num_classes=10, lr=1e-2)
    model = module.model
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.attn.qkv.weight"] == scale["norm.weight"] == 0.5  # timm: the final norm joins the last block
    assert scale["blocks.0.mlp.fc1.bias"] == 0.25
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == scale["cls_token"] == 0.125
    assert all(g["weight_decay"] == 0 for g in groups if "pos_embed" in g["names"] or "norm.bias" in g["names"])
    # and the optimizer the module builds uses them
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=8))
    by_param = {id(p): g["initial_lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert by_param[id(model.head.weight)] == pytest.approx(1e-2)
    assert by_param[id(model.pos_embed)] == pytest.approx(1e-2 * 0.125)


def test_timm_optimizer_factory_reads_our_group_matcher_like_ours():
    from timm.optim import create_optimizer_v2
    model = ImageClassifier(Backbone(img_size=16, **TINY), num_classes=10).model
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    timm_scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    ours = {id(p): g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for p in g["params"]}
    assert len(set(ours.values())) == len(model.blocks) + 2  # stem, blocks, head: the decay really applies
    assert timm_scale == ours


@pytest.mark.parametrize("freeze,trainable", [
    ("backbone", {"head.weight", "head.bias"}),
    (1, {"blocks.1.", "norm.", "head."}),
])
def test_frozen_parameters_are_untouched_and_left_out_of_the_optimizer(tmp_path, freeze, trainable):
    L.seed_everything(0)
    module = ImageClassifier(Backbone(img_size=16, freeze=freeze, **TINY), num_classes=10, lr=1e-2, warmup_epochs=0)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=16))
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, param in module.model.named_parameters():
        should_train = name in trainable or name.startswith(tuple(t for t in trainable if t.endswith(".")))
        assert (id(param) in in_optimizer) == should_train, name
        assert torch.equal(param, before[name]) != should_train, name


def test_freeze_rejects_bad_values():
    with pytest.raises(ValueError, match="model.backbone.freeze"):
        ImageClassifier(Backbone(img_size=16, freeze="head", **TINY), num_classes=3)
    model = vit.VisionTransformer(img_size=16, num_classes=3, **TINY)
    freeze_layers(model, "none")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("batch", [8, 7, 1])
@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_targets_sum_to_one(batch, mixup_alpha, cutmix_alpha):
    module = ImageClassifier(Backbone(img_size=16, **TINY), num_classes=5, mixup_alpha=mixup_alpha,
                             cutmix_alpha=cutmix_alpha, label_smoothing=0.1)
    images, targets = torch.randn(batch, 3, 16, 16), torch.arange(batch) % 5
    mixed, soft = mix_batch(module.mixup, images, targets)
    assert mixed.shape == images.shape and soft.shape == (batch, 5)
    assert torch.allclose(soft.sum(-1), torch.ones(batch)) and (soft >= 0).all()
    if batch > 1:
        assert not torch.equal(mixed[:batch - batch % 2], images[:batch - batch % 2])  # really mixed
    if batch % 2:
        assert torch.equal(mixed[-1], images[-1]) and soft[-1].argmax() == targets[-1]  # odd one out kept


def test_mixup_training_step_runs_with_an_odd_last_batch(tmp_path):
    from conftest import assert_loss_fell, write_image_folder

    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    L.seed_everything(0)
    losses = Losses()
    module = ImageClassifier(Backbone(img_size=16, **TINY), num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0,
                             lr=3e-3, warmup_epochs=0)
    trainer = _trainer(tmp_path, max_epochs=12, limit_train_batches=None, limit_val_batches=0, callbacks=[losses])
    root = write_image_folder(tmp_path / "images", classes=("a", "b", "c", "d"), per_class=15, size=16,
                              splits=("train",))  # 54 training images: batches of 7 and an odd last one of 5
    dm = ImageDataModule("imagefolder", root=str(root), img_size=16, batch_size=7, augment="none")
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_loss_fell(losses.values, window=16)  # the mixed soft targets still teach (a bright square per class)


def test_ema_weights_differ_from_raw_and_are_what_gets_evaluated(tmp_path):
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

    decay = 0.5

    class Probe(Callback):
        def __init__(self):
            self.raw, self.evaluated, self.raw_during_val = [], None, None

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.raw.append(pl_module.model.head.weight.detach().clone())

        def on_validation_batch_start(self, trainer, pl_module, *args):
            if trainer.sanity_checking:
                return
            self.evaluated = pl_module.model.head.weight.detach().clone()
            ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
            self.raw_during_val = ema._average_model.module.model.head.weight.detach().clone()

    L.seed_everything(0)
    module = ImageClassifier(Backbone(img_size=16, **TINY), num_classes=10, lr=1e-2, warmup_epochs=0, ema_decay=decay)
    probe = Probe()
    trainer = _trainer(tmp_path, limit_train_batches=4, limit_val_batches=1, callbacks=[probe],
                       num_sanity_val_steps=0)
    trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=16))
    expected = probe.raw[0]
    for weight in probe.raw[1:]:
        expected = decay * expected + (1 - decay) * weight
    assert torch.allclose(probe.evaluated, expected, atol=1e-6)  # validation ran on the EMA weights
    assert torch.equal(probe.raw_during_val, probe.raw[-1]) and not torch.allclose(expected, probe.raw[-1])
    # checkpointed: state_dict holds the EMA weights, the raw ones are kept for resuming
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    assert torch.allclose(ckpt["state_dict"]["model.head.weight"], expected, atol=1e-6)
    assert "current_model_state" in ckpt
    assert torch.allclose(vit.load_pretrained(tmp_path / "ema.ckpt").head.weight, expected, atol=1e-6)
    # fit then test a checkpoint in the same process (what `python train.py` does): the EMA weights are tested, as
    # in a later `train.py test --ckpt_path` (Lightning's own callback would put the raw weights back)
    trainer.test(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=16),
                 ckpt_path=tmp_path / "ema.ckpt", verbose=False)
    assert torch.allclose(module.model.head.weight, expected, atol=1e-6)
    assert not torch.allclose(module.model.head.weight, probe.raw[-1])


@pytest.mark.parametrize("recipe", ["linear_probe.yaml", "full.yaml", "high_res.yaml"])
def test_recipes_parse_and_take_normalisation_from_the_pretrained_weights(recipe, pretrained_dir, image_folder,
                                                                          tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli(["--config", str(RECIPES / recipe), "--data.root", str(image_folder), "--data.img_size", "16",
               "--data.num_workers", "0", "--model.backbone.pretrained", str(pretrained_dir)], run=False)
    assert app.model.model.num_classes == 2 and app.model.model.img_size == (16, 16)
    assert app.datamodule.mean == (0.25, 0.5, 0.75) and app.datamodule.std == (0.2, 0.3, 0.4)
    if recipe == "linear_probe.yaml":
        assert {n for n, p in app.model.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    else:
        assert app.model.backbone.layer_decay and app.model.hparams.ema_decay


def test_explicit_data_mean_std_win_over_the_pretrained_ones(pretrained_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli(["--config", str(RECIPES / "full.yaml"), "--data.root", str(image_folder), "--data.img_size", "16",
               "--model.backbone.pretrained", str(pretrained_dir), "--data.mean", "[0.1,0.1,0.1]"], run=False)
    assert app.datamodule.mean == (0.1, 0.1, 0.1) and app.datamodule.std == (0.2, 0.3, 0.4)


def test_full_recipe_trains_with_clipping_accumulation_auto_precision_and_early_stopping(pretrained_dir, image_folder,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli(["fit", "--config", str(RECIPES / "full.yaml"), "--data.root", str(image_folder),
               "--data.img_size", "16", "--data.batch_size", "5", "--data.num_workers", "0",
               "--model.backbone.pretrained", str(pretrained_dir), "--trainer.max_epochs", "2",
               "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    trainer = app.trainer
    from vit.training.cli import resolve_precision
    assert trainer.precision == resolve_precision("cpu") and trainer.gradient_clip_val == 1.0  # precision: auto
    assert trainer.accumulate_grad_batches == 2 and trainer.global_step == 4  # 16 images / 5 -> 4 batches / 2 x 2
    assert any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    ckpt = torch.load(next(Path(trainer.log_dir).rglob("last.ckpt")), weights_only=False)
    backbone = ckpt["hyper_parameters"]["backbone"]
    assert "current_model_state" in ckpt and backbone["pretrained"] is None  # the weights are in the checkpoint
    assert backbone["embed_dim"] == app.model.model.embed_dim  # and the architecture is recorded instead
    assert ckpt["datamodule_hyper_parameters"]["mean"] == [0.25, 0.5, 0.75]


def test_example_script_fine_tunes_and_saves(pretrained_dir, image_folder, tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("finetune_example", RECIPES.parent.parent / "examples" / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(str(image_folder), str(pretrained_dir), str(tmp_path / "out"), img_size=16, epochs=1)
    model = vit.load_pretrained(tmp_path / "out")
    assert model.pretrained_cfg["class_names"] == ["cat", "dog"] and model.pretrained_cfg["mean"] == [0.25, 0.5, 0.75]


class _GradientNorms(L.Callback):
    """Total gradient norm before clipping (Lightning's hook) and after it (the optimizer's step pre-hook)."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _norm(module) -> float:
        grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(lambda *_: self.after.append(self._norm(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._norm(pl_module))


def test_full_recipe_clips_gradients_and_stops_early(pretrained_dir, image_folder, tmp_path, monkeypatch):
    """full.yaml's gradient clipping acts (the norm the optimizer sees is at most the clip value, below the raw
    one) and its early stopping stops a run that no longer improves (here: an improvement of 1.0 is required)."""
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "stop_early.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                       "      init_args: {monitor: val/acc, mode: max, patience: 1, min_delta: 1.0}\n")
    norms = _GradientNorms()
    app = cli(["--config", str(RECIPES / "full.yaml"), "--config", str(overlay), "--data.root", str(image_folder),
               "--data.img_size", "16", "--data.batch_size", "8", "--data.num_workers", "0",
               "--model.backbone.pretrained", str(pretrained_dir), "--model.lr", "0.05", "--trainer.max_epochs", "8",
               "--trainer.gradient_clip_val", "0.05", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"], run=False)
    app.trainer.callbacks.append(norms)
    app.trainer.fit(app.model, datamodule=app.datamodule)
    assert norms.before and len(norms.after) == len(norms.before)
    assert max(norms.before) > 0.05  # the raw gradients exceed the clip value...
    assert max(norms.after) <= 0.05 * 1.001  # ...and what the optimizer steps with does not
    stopper = next(c for c in app.trainer.callbacks if type(c).__name__ == "EarlyStopping")
    assert stopper.stopped_epoch > 0 and app.trainer.current_epoch < 8  # stopped well before max_epochs


def test_high_res_recipe_runs_a_step(pretrained_dir, image_folder, tmp_path, monkeypatch):
    """high_res.yaml end to end for one optimizer step: resampled position embeddings (16 -> 32 px), gradient
    checkpointing, accumulation."""
    monkeypatch.chdir(tmp_path)
    app = cli(["fit", "--config", str(RECIPES / "high_res.yaml"), "--data.root", str(image_folder),
               "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
               "--model.backbone.pretrained", str(pretrained_dir), "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "2",  # accumulate_grad_batches 2: one optimizer step
               "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    model = app.model.model
    assert app.trainer.global_step == 1 and model.img_size == (32, 32) and model.grad_checkpointing
    assert torch.isfinite(app.trainer.callback_metrics["train/loss"])
