"""The detector choice (Faster R-CNN, RetinaNet, FCOS from torchvision) over the simple feature pyramid."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from vit import VisionTransformer
from vit.data.detection import DetectionDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.detection import ObjectDetector
from vit.tasks.pyramid import SimpleFeaturePyramid

CLASSES = ["square", "circle", "triangle"]
KINDS = {"faster_rcnn": (FasterRCNN, {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
         "retinanet": (RetinaNet, {"classification", "bbox_regression"}),
         "fcos": (FCOS, {"classification", "bbox_regression", "bbox_ctrness"})}


def detector(kind: str = "faster_rcnn", **kwargs) -> ObjectDetector:
    torch.manual_seed(0)
    backbone = kwargs.pop("backbone", Backbone(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    # FCOS's GroupNorm(32) needs more than one value per group on the 1x1 coarsest map: 64 channels
    return ObjectDetector(backbone, num_classes=3, class_names=CLASSES, detector=kind, out_channels=64,
                          representation_size=64, **kwargs)


class Recorder(L.Callback):
    """Each step's loss and the logged train/* names."""

    def __init__(self):
        self.losses, self.terms = [], set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs is not None:
            self.losses.append(float(outputs["loss"]))
        self.terms |= {k for k in trainer.callback_metrics if k.startswith("train/")}


def fit(module: ObjectDetector, tmp_path, steps: int = 12, callbacks=(), **trainer_kwargs) -> L.Trainer:
    """A few steps on the same 8 tiny shape scenes (no augmentation), so the loss can only fall."""
    data = DetectionDataModule("shapes", img_size=64, num_images=10, batch_size=4, val_fraction=0.1,
                               test_fraction=0.1, scale_range=(1.0, 1.0), hflip=False)
    trainer = L.Trainer(**{**dict(max_steps=steps, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path),
                           **trainer_kwargs})
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_detector_trains_predicts_and_round_trips_through_a_checkpoint(kind, tmp_path):
    module = detector(kind, lr=2e-3, warmup_epochs=0.0, score_thresh=0.001)  # a focal-loss head starts near 0.01
    expected_type, terms = KINDS[kind]
    assert isinstance(module.detector, expected_type)
    recorder = Recorder()
    trainer = fit(module, tmp_path, callbacks=[recorder])
    losses = recorder.losses
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert {f"train/{t}" for t in terms} | {"train/loss"} <= recorder.terms
    assert 0.0 <= float(trainer.callback_metrics["val/map"]) <= 1.0
    # predictions: xyxy boxes inside the input image, scores in [0, 1], the data's labels 0..K-1
    module.eval()
    with torch.no_grad():
        (found,) = module([torch.rand(3, 64, 48)])
    assert set(found) == {"boxes", "scores", "labels"} and found["boxes"].shape[1:] == (4,)
    boxes, labels, scores = found["boxes"], found["labels"], found["scores"]
    assert len(boxes) == len(labels) == len(scores) > 0
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and (boxes[:, [0, 2]] <= 48).all() and (boxes[:, [1, 3]] <= 64).all()
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 3
    assert ((scores >= 0) & (scores <= 1)).all()
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = ObjectDetector.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    assert restored.hparams.detector == kind and isinstance(restored.detector, expected_type)
    assert sorted(restored.state_dict()) == sorted(module.state_dict())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in restored.state_dict().items())
    x = torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = restored([x])[0], module([x])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_one_stage_detectors_read_levels_3_to_7_and_take_labels_unshifted(kind):
    module = detector(kind, backbone=Backbone(img_size=128, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    spec = module.detector.backbone.spec
    assert spec.names == ("p3", "p4", "p5", "p6", "p7") and spec.strides == (8, 16, 32, 64, 128)
    assert module.detector.transform.size_divisible == 128 and module.label_offset == 0
    assert module.detector.head.classification_head.num_classes == 3  # no background class in a sigmoid head
    anchors = module.detector.anchor_generator
    per_level = [sizes for sizes in anchors.sizes]
    if kind == "retinanet":  # torchvision's COCO RetinaNet: 32 at stride 8, three scales an octave apart
        assert per_level[0] == (32, 40, 50) and anchors.num_anchors_per_location() == [9] * 5
    else:  # FCOS: one anchor of the stride's size per cell
        assert per_level == [(8,), (16,), (32,), (64,), (128,)]
    no_decay = module.no_weight_decay()
    assert "detector.head.classification_head.cls_logits.bias" in no_decay
    assert "detector.backbone.top_block.p6.bias" in no_decay
    assert "detector.head.classification_head.cls_logits.weight" not in no_decay
    assert set(module.layer_ids()) == {n for n, _ in module.named_parameters()}


def test_pyramid_p6p7_top_block_is_torchvisions_and_named_by_stride():
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    pyramid = SimpleFeaturePyramid(vit, out_channels=16, scale_factors=(2.0, 1.0, 0.5), top_block="p6p7")
    assert type(pyramid.top_block).__name__ == "LastLevelP6P7"
    spec = pyramid.spec
    assert spec.names == ("p2", "p3", "p4", "p5", "p6") and spec.extra_levels == ("p5", "p6")
    with torch.no_grad():
        maps = pyramid(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in maps.items()} == {"p2": (16, 16), "p3": (8, 8), "p4": (4, 4),
                                                                "p5": (2, 2), "p6": (1, 1)}
    # p5 is torchvision's stride-2 3x3 conv of p4
    assert torch.allclose(maps["p5"], pyramid.top_block.p6(maps["p4"]), atol=1e-6)
    with pytest.raises(ValueError, match="top_block"):
        SimpleFeaturePyramid(vit, top_block="p6")


def test_bad_detector_settings_name_the_key():
    with pytest.raises(ValueError, match="model.detector: expected one of faster_rcnn, retinanet, fcos"):
        detector("yolo")
    with pytest.raises(ValueError, match="model.out_channels: FCOS's head .* multiple of 32, got 48"):
        ObjectDetector(Backbone(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=2,
                       detector="fcos", out_channels=48)


# ---- training features shared with the classifier ------------------------------------------------------------
def test_ema_weights_are_what_validation_and_checkpoints_see(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging
    decay, name = 0.5, "detector.roi_heads.box_predictor.cls_score.weight"

    class Probe(L.Callback):
        def __init__(self):
            self.raw, self.evaluated, self.raw_during_val = [], None, None

        def on_train_batch_end(self, trainer, module, *args):
            self.raw.append(module.get_parameter(name).detach().clone())

        def on_validation_batch_start(self, trainer, module, *args):
            self.evaluated = module.get_parameter(name).detach().clone()
            ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
            self.raw_during_val = ema._average_model.module.get_parameter(name).detach().clone()

    probe = Probe()
    # 2 epochs of 2 batches: the last validation follows the 4th step
    trainer = fit(detector(lr=1e-2, warmup_epochs=0.0, ema_decay=decay), tmp_path, steps=4, callbacks=[probe])
    expected = probe.raw[0]
    for weight in probe.raw[1:]:
        expected = decay * expected + (1 - decay) * weight
    assert torch.allclose(probe.evaluated, expected, atol=1e-6)  # validation ran on the EMA weights
    assert torch.equal(probe.raw_during_val, probe.raw[-1]) and not torch.allclose(expected, probe.raw[-1])
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    checkpoint = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    assert torch.allclose(checkpoint["state_dict"][name], expected, atol=1e-6) and "current_model_state" in checkpoint
    with pytest.raises(ValueError, match="model.ema_decay"):
        detector(ema_decay=1.5)


def test_budget_schedule_decays_over_the_time_allowed(tmp_path):
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = detector(lr=1e-3, warmup_epochs=0.0, min_lr_ratio=0.01, schedule="budget")
    trainer = fit(module, tmp_path, steps=-1, callbacks=[RecordLR()], max_time={"seconds": 8}, max_epochs=-1)
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
    assert timer.time_elapsed("train") >= 7.5 and len(lrs) >= 4  # the time, not a step count, ended training
    assert max(lrs) > 0.5e-3 and lrs[-1] < 0.2e-3, lrs  # from near the peak to (nearly) the floor
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs  # no warm-up asked for: a cosine that only falls
    with pytest.raises(ValueError, match="trainer.max_time"):
        fit(detector(schedule="budget"), tmp_path, steps=2)
    with pytest.raises(ValueError, match="model.schedule: expected one of epochs, budget"):
        detector(schedule="minutes")


def test_drop_path_reaches_the_blocks_also_from_a_pretrained_source(tmp_path):
    from vit import save_pretrained
    arch = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    save_pretrained(VisionTransformer(**arch, num_classes=0), tmp_path / "tiny")
    for backbone in (Backbone(**arch, drop_path_rate=0.2), Backbone(pretrained=str(tmp_path / "tiny"),
                                                                    drop_path_rate=0.2)):
        vit = detector(backbone=backbone).detector.backbone.vit
        assert [b.drop_path1.drop_prob for b in vit.blocks[1:]] == pytest.approx([0.1, 0.2])
        assert isinstance(vit.blocks[0].drop_path1, torch.nn.Identity)  # the linear rule starts at 0
    pyramid = detector(backbone=Backbone(**arch, drop_path_rate=0.5)).detector.backbone
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(pyramid.train()(x)["p3"], pyramid(x)["p3"])  # a different path each call
        assert torch.equal(pyramid.eval()(x)["p3"], pyramid(x)["p3"])


def _poisoned(**kwargs) -> ObjectDetector:
    module = detector(**kwargs)
    with torch.no_grad():
        module.detector.roi_heads.box_predictor.cls_score.bias.fill_(float("nan"))
    return module


def test_a_nonfinite_loss_stops_naming_step_rate_and_terms(tmp_path):
    from vit.tasks.common import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"nan = \{'loss_classifier': nan.*at step 0 .*learning rate"):
        fit(_poisoned(), tmp_path, steps=2)


def test_a_nonfinite_loss_is_skipped_and_counted(tmp_path):
    module = _poisoned(nonfinite_loss="skip")
    before = module.detector.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.warns(UserWarning, match="skipping a batch with a non-finite loss"):
        trainer = fit(module, tmp_path, steps=-1, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    assert module.nonfinite_skipped == 4  # no gradient reached AdamW, so no weight moved
    assert torch.equal(module.detector.backbone.vit.blocks[0].attn.qkv.weight, before)
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    assert torch.load(tmp_path / "skipped.ckpt", weights_only=False)["nonfinite_skipped"] == 4


def test_the_cli_takes_the_detector_and_training_features(tmp_path):
    from pathlib import Path

    from vit.training.cli import cli
    recipe = Path(__file__).resolve().parents[2] / "configs" / "detection" / "shapes.yaml"
    app = cli(["--config", str(recipe), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
               "--data.num_workers", "0", "--model.detector", "retinanet", "--model.ema_decay", "0.99",
               "--model.schedule", "budget", "--model.nonfinite_loss", "skip", "--model.backbone.window_size", "4",
               "--model.backbone.global_attn_indexes", "[1, 3]", "--model.backbone.drop_path_rate", "0.1"], run=False)
    module = app.model
    assert isinstance(module.detector, RetinaNet)
    assert (module.hparams.ema_decay, module.hparams.schedule, module.hparams.nonfinite_loss) == (0.99, "budget",
                                                                                                  "skip")
    vit = module.detector.backbone.vit
    assert [b.attn.window_size for b in vit.blocks] == [4, 0, 4, 0] and vit.config.drop_path_rate == 0.1
