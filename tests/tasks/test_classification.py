import lightning as L
import pytest
import torch

from vit import VisionTransformer
from vit.data import ImageDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ImageClassifier
from vit.training.optim import param_groups, warmup_cosine

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY = dict(backbone=Backbone(**ARCH), num_classes=10)


def test_arch_name_with_explicit_overrides():
    module = ImageClassifier(Backbone(arch="vit_small_patch16_224", img_size=32, depth=1), num_classes=3)
    assert module.model.embed_dim == 384 and len(module.model.blocks) == 1 and module.model.num_classes == 3


def test_weight_decay_groups_follow_no_weight_decay():
    model = VisionTransformer(**ARCH, num_classes=10)
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    skipped = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert skipped == model.no_weight_decay()
    assert decayed | skipped == {n for n, _ in model.named_parameters()}
    assert "pos_embed" in skipped and "cls_token" in skipped and "blocks.0.mlp.fc1.weight" in decayed


def test_schedule_warms_up_then_decays_to_floor():
    values = [warmup_cosine(s, 10, 100, 0.01) for s in range(101)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert max(values) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.01)


def _trainer(tmp_path, **kwargs):
    defaults = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", devices=1,
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path))
    return L.Trainer(**{**defaults, **kwargs})


def test_checkpoint_reloads_and_predicts_identically(tmp_path):
    L.seed_everything(0)
    dm = ImageDataModule("digits", img_size=16, batch_size=16)
    module = ImageClassifier(**TINY, class_names=dm.class_names, lr=1e-3)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True).eval()
    module.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))
    assert restored.class_names == dm.class_names
    assert restored.hparams.backbone["embed_dim"] == 32 and restored.backbone.embed_dim == 32


def test_training_step_lowers_loss_and_logs_metrics(tmp_path):
    L.seed_everything(0)
    dm = ImageDataModule("digits", img_size=16, batch_size=32, augment="none")
    module = ImageClassifier(**TINY, lr=3e-3, warmup_epochs=0)
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=None)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"val/acc", "val/acc_top5", "val/loss", "train/acc"} <= set(metrics)
    assert metrics["val/loss"] < before["val/loss"] - 0.1
    assert metrics["val/acc"] > 0.2  # 10 classes: chance is 0.1
    assert metrics["val/acc_top5"] >= metrics["val/acc"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0), "model.lr"), (dict(label_smoothing=1.5), "model.label_smoothing"),
    (dict(backbone={"layer_decay": 2.0}), "model.backbone.layer_decay"), (dict(class_names=["a"]), "class_names"),
    (dict(nonfinite_loss="ignore"), "model.nonfinite_loss"),
])
def test_bad_training_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**{**TINY, **kwargs})


def test_budget_schedule_decays_over_the_time_allowed_not_the_steps(tmp_path):
    import lightning as L

    from vit.data import ImageDataModule
    L.seed_everything(0)
    module = ImageClassifier(Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=10,
                             lr=1e-3, warmup_epochs=0.2, min_lr_ratio=0.01, schedule="budget")
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_time={"seconds": 6}, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=2, callbacks=[RecordLR()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=32))
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
    assert timer.time_elapsed("train") >= 5.5  # the time, not an epoch count, ended training
    assert trainer.current_epoch >= 1 and len(lrs) > 20
    assert max(lrs) > 0.8e-3  # warmed up to (nearly) the peak...
    assert lrs[-1] < 0.1e-3  # ...and decayed to (nearly) the floor exactly as the time ran out


def test_budget_schedule_without_a_time_budget_is_a_clear_error(tmp_path):
    import lightning as L

    from vit.data import ImageDataModule
    module = ImageClassifier(Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=10,
                             schedule="budget")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="trainer.max_time"):
        trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=32))
