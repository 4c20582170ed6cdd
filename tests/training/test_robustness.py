"""Bad configs end with one clear message; non-finite loss stops or skips; class lists must agree; determinism."""
import lightning as L
import pytest
import torch

from vit.data import ImageDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ClassMismatchError, ImageClassifier, NonFiniteLossError
from vit.training.cli import DEFAULT_CONFIG, main

QUICK = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", "--model.backbone.embed_dim", "32",
         "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--data.img_size", "16"]
TINY = dict(backbone=Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=10)


@pytest.mark.parametrize("args, expected", [
    (["--model.backbone.arch", "vit_smal_patch16_224"], "vit_small_patch16_224"),
    (["--model.backbone.patch_size", "5"], "not divisible by patch_size"),
    (["--model.backbone.embed_dim", "33"], "not divisible by num_heads"),
    (["--model.backbone.drop_path_rate", "-0.1"], "drop_path_rate"),
    (["--model.lr", "-1"], "model.lr"),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "4096"], "trainer.devices: asked for 4096"),
    (["--data.on_bad_image", "ignore"], "on_bad_image"),
])
def test_bad_config_is_one_clear_message_before_training(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(DEFAULT_CONFIG), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def _trainer(tmp_path, **kwargs):
    return L.Trainer(**{**dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu",
                               devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                               enable_model_summary=False, default_root_dir=tmp_path), **kwargs})


def _poisoned(**kwargs):
    module = ImageClassifier(**TINY, **kwargs)
    with torch.no_grad():
        module.model.head.bias.fill_(float("nan"))
    return module


def test_nonfinite_loss_stops_naming_step_and_learning_rate(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 0 .*learning rate"):
        _trainer(tmp_path).fit(_poisoned(), datamodule=ImageDataModule("digits", img_size=16, batch_size=32))


def test_nonfinite_loss_skip_counts_and_never_steps(tmp_path):
    module = _poisoned(nonfinite_loss="skip")
    before = module.model.blocks[0].attn.qkv.weight.detach().clone()
    trainer = _trainer(tmp_path)
    with pytest.warns(UserWarning, match="skipping a batch with a non-finite loss"):
        trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=32))
    assert module.nonfinite_skipped == 3  # no gradient reached AdamW, so no weight moved
    assert torch.equal(module.model.blocks[0].attn.qkv.weight, before)


def test_checkpoint_with_other_classes_is_an_error_showing_both(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    module = ImageClassifier(**TINY, class_names=[str(i) for i in range(10)])
    trainer.fit(module, datamodule=ImageDataModule("digits", img_size=16, batch_size=32))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = ImageClassifier(**TINY, class_names=[f"c{i}" for i in range(10)])
    with pytest.raises(ClassMismatchError, match=r"checkpoint \(10\): \['0'.*\n.*data .*\['c0'"):
        _trainer(tmp_path).test(other, datamodule=ImageDataModule("digits", img_size=16, batch_size=32),
                                ckpt_path=tmp_path / "m.ckpt", weights_only=True)


def test_default_recipe_is_bit_identical_across_seeded_deterministic_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def flat(module):
        return torch.cat([p.detach().flatten().clone() for p in module.parameters()])

    initial = []  # each run's weights as training starts (Lightning calls on_fit_start before the first step)
    monkeypatch.setattr(ImageClassifier, "on_fit_start", lambda self: initial.append(flat(self)), raising=False)
    runs = []
    for _ in range(2):
        app = main([*QUICK, "--trainer.deterministic", "true", "--model.backbone.drop_rate", "0.1"])
        runs.append(({k: float(v) for k, v in app.trainer.callback_metrics.items()}, flat(app.model)))
    assert runs[0][0] == runs[1][0] and runs[0][0]
    assert torch.equal(runs[0][1], runs[1][1])
    # ... and not because nothing was trained: the weights moved away from their (equally seeded) start
    assert len(initial) == 2 and torch.equal(initial[0], initial[1])
    assert initial[0].shape == runs[0][1].shape and (runs[0][1] - initial[0]).abs().max() > 1e-4
