"""Segmentation: heads on forward_intermediates, the Segmenter's loss, metrics and sliding windows, the training CLI
and `vit predict` with a segmentation checkpoint."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit import VisionTransformer
from vit.tasks.backbone import Backbone
from vit.tasks.heads import DPTHead, LinearHead, SegmentationModel, evenly_spaced_blocks, sliding_window
from vit.tasks.segmentation import Segmenter, segmentation_scores

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "segmentation" / "shapes.yaml"


def _vit(patch: int, depth: int = 2, **fields) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=4 * patch, patch_size=patch, embed_dim=32, depth=depth, num_heads=2,
                             num_classes=0, dynamic_img_size=True, **fields)


@pytest.mark.parametrize("head", ["linear", "linear_ms", "dpt"])
@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("size", [(32, 32), (29, 45), (57, 31)])
def test_heads_give_logits_at_the_image_size_for_any_patch_and_odd_sizes(head, patch, size):
    model = SegmentationModel(_vit(patch, reg_tokens=2), num_classes=3, head=head, channels=16).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size) and torch.isfinite(logits).all()


def test_heads_read_the_blocks_they_say_from_forward_intermediates():
    """linear: the last block's normed patch map; linear_ms: 4 evenly spaced ones (class/register tokens out)."""
    vit = _vit(8, depth=4, reg_tokens=1).eval()
    linear = SegmentationModel(vit, 3, "linear").eval()
    multi = SegmentationModel(vit, 3, "linear_ms").eval()
    assert linear.blocks == [3] and multi.blocks == [0, 1, 2, 3] and evenly_spaced_blocks(12) == [2, 5, 8, 11]
    assert isinstance(linear.head, LinearHead) and linear.head.classifier.in_channels == 32
    assert multi.head.classifier.in_channels == 4 * 32
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        x = (images - linear.mean) / linear.std
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]  # forward_features ends with the final norm
        expected = linear.head([tokens.transpose(1, 2).reshape(1, 32, 4, 4)])
        got = linear(images)
    assert torch.allclose(got, F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False),
                          atol=1e-5)


def test_dpt_decoder_works_at_four_times_the_patch_grid():
    head = DPTHead(32, num_maps=4, num_classes=5, channels=16)
    maps = [torch.rand(1, 32, 3, 5) for _ in range(4)]
    assert head(maps).shape == (1, 5, 12, 20) and head.sources == [0, 1, 2, 3]
    assert DPTHead(32, num_maps=2, num_classes=5).sources == [0, 0, 1, 1]


def _segmenter(**kwargs) -> Segmenter:
    torch.manual_seed(0)
    backbone = Backbone(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return Segmenter(backbone, **{"num_classes": 3, "head": "linear", **kwargs})


def test_ignore_pixels_never_count_in_loss_or_metric():
    module = _segmenter(class_weights=[1.0, 2.0, 0.5])
    logits = torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[:, :3] = 255
    loss = module.loss(logits, masks)
    # the same loss whatever the logits are under ignored pixels, and equal to the weighted mean over the others
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8) * 100
    assert torch.allclose(module.loss(changed, masks), loss)
    keep = masks != 255
    per_pixel = F.cross_entropy(logits, masks.clamp(max=2), reduction="none")
    weights = module.class_weights[masks.clamp(max=2)]
    assert torch.allclose(loss, (per_pixel * weights)[keep].sum() / weights[keep].sum())
    # an all-ignore crop gives 0, not NaN, and still backpropagates
    assert module.loss(logits.requires_grad_(), torch.full((2, 8, 8), 255)).item() == 0.0
    module.val_confmat.update(changed.argmax(1).flatten(), masks.flatten())
    assert int(module.val_confmat.compute().sum()) == int(keep.sum())


def test_miou_equals_a_hand_confusion_matrix_computation():
    """A fixed 3-class example: per-class IoU = TP / (TP + FP + FN) from a confusion matrix counted by hand."""
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [1, 2, 0, 2]])
    hand = np.zeros((3, 3), int)
    for t, p in zip(target.flatten().tolist(), predicted.flatten().tolist()):
        if t != 255:
            hand[t, p] += 1
    assert hand.tolist() == [[2, 1, 0], [0, 3, 0], [1, 1, 2]]
    iou = [hand[k, k] / (hand[k].sum() + hand[:, k].sum() - hand[k, k]) for k in range(3)]  # 2/4, 3/5, 2/4
    module = _segmenter()
    logits = F.one_hot(predicted, 3).permute(2, 0, 1)[None].float()
    module.test_confmat.update(logits.argmax(1).flatten(), target.flatten())
    matrix = module.test_confmat.compute()
    assert matrix.tolist() == hand.tolist()
    scores = segmentation_scores(matrix)
    assert np.allclose(scores["iou"].numpy(), iou)
    assert scores["miou"] == pytest.approx(np.mean(iou)) and scores["pixel_acc"] == pytest.approx(7 / 10)
    values = module.epoch_scores(module.test_confmat, "test", matrix)
    assert values == {"test/miou": pytest.approx(0.5333333), "test/pixel_acc": pytest.approx(0.7)}


def test_sliding_window_equals_whole_image_inference_when_the_window_covers_it():
    module = _segmenter(window=48, stride=16).eval()
    images = torch.rand(2, 3, 40, 45)
    with torch.no_grad():
        assert torch.equal(module.predict_logits(images), module(images))
        # smaller windows: every pixel is the mean of the windows covering it
        windows = sliding_window(module.model, images, 32, 8)
        left, right = module(images[..., :32, :32]), module(images[..., :32, 8:40])
    assert windows.shape == (2, 3, 40, 45)
    assert torch.allclose(windows[..., :8, :8], left[..., :8, :8], atol=1e-5)
    # columns start at 0, 8, 13 (the last flush with the edge): columns 8-12 of the top rows are in two windows
    assert torch.allclose(windows[..., :8, 8:13], (left[..., :8, 8:13] + right[..., :8, :5]) / 2, atol=1e-5)


def test_frozen_protocol_trains_the_head_only_and_layer_decay_reaches_every_parameter():
    frozen = Segmenter(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, freeze="backbone"),
                       num_classes=3, head="linear_ms")
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.head.") for n in trainable)
    full = Segmenter(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, layer_decay=0.5),
                     num_classes=3, head="dpt", head_channels=16)
    ids = full.layer_ids()
    assert set(ids) == {n for n, _ in full.named_parameters()}
    assert ids["model.head.classifier.3.weight"] == max(ids.values()) > ids["model.vit.blocks.1.attn.qkv.weight"]
    assert "model.vit.pos_embed" in full.no_weight_decay() and "model.head.classifier.1.weight" in \
        full.no_weight_decay()


def test_segmenter_refuses_bad_settings():
    with pytest.raises(ValueError, match="model.class_weights: expected 3 non-negative weights"):
        _segmenter(class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="model.ignore_index 1 is one of the classes 0..2"):
        _segmenter(ignore_index=1)
    with pytest.raises(ValueError, match="model.head: expected one of linear, linear_ms, dpt"):
        _segmenter(head="fcn")


# flags for a seconds-long run of the shapes recipe with a tiny model
TINY_RUN = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
            "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
            "--data.num_images", "32", "--data.img_size", "32", "--data.batch_size", "4",
            "--model.backbone.embed_dim", "32", "--model.backbone.depth", "2", "--model.backbone.num_heads", "2",
            "--model.head_channels", "16"]


def test_the_shapes_recipe_builds_through_the_training_cli(tmp_path):
    """`task: segmentation` picks Segmenter + SegmentationDataModule; classes, crop size and ignore index come from
    the data; checkpoints follow val/miou."""
    from vit.data.segmentation import SegmentationDataModule
    from vit.training.cli import cli
    app = cli(["--config", str(RECIPE), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
               "--data.num_workers", "0", "--data.ignore_index", "250"], run=False)
    assert isinstance(app.model, Segmenter) and isinstance(app.datamodule, SegmentationDataModule)
    assert app.model.image_size == app.datamodule.img_size == 64 and app.model.ignore_index == 250
    assert app.model.class_names == app.datamodule.class_names == ["background", "square", "circle", "triangle"]
    assert app.model.hparams.head == "dpt"
    monitor = next(c for c in app.trainer.callbacks if type(c).__name__ == "LastCheckpoint").monitor
    assert monitor == "val/miou"


def test_train_py_fits_and_tests_a_segmenter_and_writes_the_iou_report(tmp_path, monkeypatch, capsys):
    from vit.training.cli import main
    monkeypatch.chdir(tmp_path)
    app = main(["--config", str(RECIPE), *TINY_RUN])
    out = capsys.readouterr().out
    assert "shapes test mIoU: " in out and "held-out images | wall time:" in out
    assert any("-miou" in p.name for p in tmp_path.rglob("epoch*.ckpt"))
    assert 0 <= app.trainer.callback_metrics["test/miou"] <= 1
    with open(next(tmp_path.rglob("per_class_iou.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["background", "square", "circle", "triangle"]
    assert sum(int(r["pixels"]) for r in rows) > 0
    # `train.py test --ckpt_path last` finds the run's last.ckpt and scores exactly those weights
    last = next(tmp_path.rglob("last.ckpt"))
    expected = app.trainer.test(app.model, datamodule=app.datamodule, ckpt_path=str(last))[0]["test/miou"]
    tested = main(["test", "--config", str(RECIPE), *TINY_RUN, "--ckpt_path", "last"])
    assert float(tested.trainer.callback_metrics["test/miou"]) == pytest.approx(expected, abs=1e-6)


def test_vit_predict_writes_an_index_mask_and_an_overlay_for_a_segmentation_checkpoint(tmp_path, monkeypatch,
                                                                                      capsys):
    from PIL import Image

    from vit.commands.predict import main as predict_main
    from vit.data.shapes import make_shape_masks
    from vit.training.cli import main
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPE), *TINY_RUN])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    images = tmp_path / "images"
    images.mkdir()
    sizes = {}
    for i, (image, _) in enumerate(make_shape_masks(2, size=50, seed=9)):  # not multiples of the patch or window
        Image.fromarray(image).save(images / f"scene{i}.png")
        sizes[f"scene{i}"] = image.shape[:2]
    capsys.readouterr()
    assert predict_main([str(images), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("scene") == 2 and "wrote 2 masks and overlays" in out
    for stem, (height, width) in sizes.items():
        mask = Image.open(tmp_path / "out" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (width, height)
        assert np.asarray(mask).max() < 4  # class indices, the palette only colours them
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == (width, height)
    assert predict_main([str(tmp_path / "nothing"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2


DDP_SCRIPT = """
import json, sys
from pathlib import Path

import lightning as L
import torch

from vit.data.segmentation import SegmentationDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.segmentation import Segmenter


class Record(L.Callback):
    # runs before the module's own epoch-end hook, while the validation confusion matrix still holds the epoch
    def on_validation_epoch_end(self, trainer, module):
        self.pixels = int(module.val_confmat.compute().sum())  # summed over the ranks by torchmetrics

    def on_fit_end(self, trainer, module):
        data = trainer.datamodule
        valid = sum(int((data.val_set[i][1] != 255).sum()) for i in range(len(data.val_set)))
        torch.save({"weights": torch.cat([p.detach().flatten() for p in module.parameters()]),
                    "step": trainer.global_step, "world": trainer.world_size, "pixels": self.pixels,
                    "valid_pixels": valid, "miou": float(trainer.callback_metrics["val/miou"]),
                    "sampler": type(trainer.train_dataloader.sampler).__name__},
                   Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    dm = SegmentationDataModule("shapes", img_size=32, num_images=32, val_fraction=0.25, test_fraction=0.125,
                                batch_size=4)
    module = Segmenter(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=4,
                       head="dpt", head_channels=8, image_size=32)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
"""


@pytest.mark.slow  # two processes start torch and Lightning: about half a minute on 2 CPU cores
def test_ddp_two_cpu_processes_fit_a_segmenter_in_sync_with_metrics_over_both_shares(tmp_path):
    from conftest import run_script
    script = tmp_path / "ddp_segmentation.py"
    script.write_text(DDP_SCRIPT)
    result = run_script(script, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 and r["sampler"] == "EpochSampler" for r in ranks)
    assert ranks[0]["step"] == ranks[1]["step"] == 3  # 20 training scenes, 10 per rank, batches of 4
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # gradients averaged over the ranks
    # each rank validated half of the 8 held-out scenes; the matrix both logged counts every labelled pixel of all 8
    assert ranks[0]["pixels"] == ranks[1]["pixels"] == ranks[0]["valid_pixels"]
    assert ranks[0]["miou"] == ranks[1]["miou"]


@pytest.mark.slow  # three short CLI runs in subprocesses: about a minute on 2 shared CPU cores
def test_sigkill_mid_epoch_then_resume_last_equals_an_uninterrupted_run(tmp_path):
    from conftest import KILL_AT, SAVE_EVERY_4_STEPS, train_process
    args = ["fit", "--config", RECIPE, *TINY_RUN, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
            "--trainer.deterministic", "true", "--trainer.accelerator", "cpu", *SAVE_EVERY_4_STEPS]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kill_at.py").write_text(KILL_AT)
    full = train_process(tmp_path / "a", *args)
    # killed before step 6 (the last batch of epoch 0); the save point at step 4 is what survives
    victim = train_process(tmp_path / "b", *args, "--trainer.callbacks+=kill_at.KillAt", "--trainer.callbacks.step=5")
    assert victim.wait(timeout=300) == -9, victim.communicate()[0][-3000:]
    (survivor,) = list((tmp_path / "b" / "runs").rglob("last.ckpt"))
    saved = torch.load(survivor, weights_only=True)
    assert saved["global_step"] == 4 and saved["SegmentationDataModule"] == {"epoch": 0, "batches_done": 4}
    resumed = train_process(tmp_path / "b", *args, "--ckpt_path", "last")
    out_resumed, out_full = resumed.communicate(timeout=300)[0], full.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and full.returncode == 0, out_resumed[-3000:] + out_full[-3000:]
    assert "resumed from" in out_resumed and "global step 4" in out_resumed

    def final(folder):
        last = max((folder / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        checkpoint = torch.load(last, weights_only=True)
        return checkpoint["state_dict"], checkpoint["global_step"]

    (reference, reference_step), (got, step) = final(tmp_path / "a"), final(tmp_path / "b")
    assert step == reference_step == 12
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_the_folder_recipe_reads_a_mask_folder_and_its_classes(tmp_path):
    from vit.data.masks import write_mask_folder
    from vit.data.shapes import make_shape_masks
    from vit.training.cli import cli
    write_mask_folder(make_shape_masks(4, size=40, seed=1), ["bg", "square", "circle", "triangle"], tmp_path / "d")
    app = cli(["--config", str(RECIPE.with_name("folder.yaml")), "--data.root", str(tmp_path / "d"),
               "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--data.num_workers", "0",
               "--model.backbone.depth", "1"], run=False)
    assert app.model.class_names == ["bg", "square", "circle", "triangle"] and app.model.image_size == 256
    assert app.model.hparams.backbone["layer_decay"] == 0.75 and app.model.hparams.head == "dpt"
    app.datamodule.setup("fit")
    assert len(app.datamodule.train_set) == 3 and len(app.datamodule.val_set) == 1  # val carved from train


def test_a_run_lists_its_skipped_samples_in_the_run_directory(tmp_path, monkeypatch):
    from PIL import Image

    from vit.data.masks import write_mask_folder
    from vit.data.shapes import make_shape_masks
    from vit.training.cli import main
    root = write_mask_folder(make_shape_masks(8, size=40, seed=1), ["bg", "square", "circle", "triangle"],
                             tmp_path / "d")
    bad = root / "masks" / "train" / "000002.png"
    size = Image.open(bad).size[::-1]
    Image.fromarray(np.full(size, 9, np.uint8), mode="L").save(bad)  # a label beyond the 4 classes
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="skipping"):
        main(["fit", "--config", str(RECIPE), *TINY_RUN, "--data.dataset", "folder", "--data.root", str(root),
              "--data.val_fraction", "0.125", "--trainer.limit_train_batches", "null"])
    (listing,) = list((tmp_path / "runs").rglob("skipped_samples.tsv"))
    assert listing.parent.name.startswith("version_")  # the run directory, beside config.yaml
    lines = listing.read_text().splitlines()
    assert lines and all(line == f"{bad}\tlabel value(s) [9] are neither a class (0..3) nor the ignore index 255"
                         for line in lines)


# ---- training features shared with the classifier and the detector ----------------------------------------------
def _fit_on_shapes(module, tmp_path, callbacks=(), **trainer_args):
    import lightning as L

    from vit.data.segmentation import SegmentationDataModule
    data = SegmentationDataModule("shapes", img_size=32, num_images=16, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=1,
                        callbacks=list(callbacks), **trainer_args)
    trainer.fit(module, datamodule=data)
    return trainer


def test_segmenter_budget_schedule_decays_over_the_time_allowed(tmp_path):
    import lightning as L
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = _segmenter(num_classes=4, lr=1e-3, warmup_epochs=0.0, min_lr_ratio=0.01, schedule="budget")
    trainer = _fit_on_shapes(module, tmp_path, [RecordLR()], max_time={"seconds": 6}, max_epochs=-1)
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
    assert timer.time_elapsed("train") >= 5.5 and len(lrs) >= 4  # the time, not a step count, ended training
    assert max(lrs) > 0.5e-3 and lrs[-1] < 0.5 * max(lrs), lrs  # from near the peak, decaying with the time
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs
    with pytest.raises(ValueError, match="model.schedule: expected one of epochs, budget"):
        _segmenter(schedule="minutes")


def test_segmenter_skips_and_counts_a_nonfinite_loss(tmp_path):
    module = _segmenter(num_classes=4, nonfinite_loss="skip")
    original = module.loss
    module.loss = lambda logits, masks: original(logits, masks) * float("nan") if module.training else \
        original(logits, masks)
    with pytest.warns(UserWarning, match="skipping a batch with a non-finite loss"):
        _fit_on_shapes(module, tmp_path, max_epochs=1, limit_train_batches=2)
    assert module.nonfinite_skipped == 2
    with pytest.raises(Exception, match="non-finite training loss"):
        module = _segmenter(num_classes=4)
        module.loss = lambda logits, masks: logits.sum() * float("nan")
        _fit_on_shapes(module, tmp_path, max_epochs=1, limit_train_batches=1)


@pytest.mark.slow
def test_the_small_data_recipe_trains_a_mask_folder_within_its_time_budget(tmp_path, monkeypatch, capsys):
    from vit.data.masks import write_mask_folder
    from vit.data.shapes import make_shape_masks
    from vit.training.cli import run_default
    root = write_mask_folder(make_shape_masks(12, size=40, seed=2), ["bg", "square", "circle", "triangle"],
                             tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    app = run_default(["--config", str(RECIPE.with_name("small_data.yaml")), "--data.root", str(root),
                       "--trainer.max_time", "00:00:00:08", "--trainer.enable_progress_bar", "false",
                       "--data.num_workers", "0", "--model.backbone.embed_dim", "32", "--model.backbone.depth", "1",
                       "--model.backbone.num_heads", "2"])
    assert app.model.hparams.schedule == "budget" and app.trainer.current_epoch >= 1  # epochs fitted to the time
    assert "test mIoU" in capsys.readouterr().out
