"""Detection: the simple feature pyramid, the detection data module and the ObjectDetector task."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from vit import VisionTransformer, save_pretrained
from vit.data.detection import (
    BadAnnotationError,
    DetectionDataModule,
    DetectionDataset,
    detection_eval_transform,
    detection_train_transform,
    make_shapes,
    read_coco,
    write_coco,
)
from vit.data.sampling import seed_transform
from vit.tasks.backbone import Backbone
from vit.tasks.detection import ObjectDetector
from vit.tasks.pyramid import PyramidSpec, SimpleFeaturePyramid, pad_to_multiple


def _vit(patch: int, img_size, **fields) -> VisionTransformer:
    torch.manual_seed(0)
    fields = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0, **fields}
    return VisionTransformer(img_size=img_size, patch_size=patch, **fields).eval()


# ---- pyramid -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, size, names", [
    (8, (32, 32), ("p1", "p2", "p3", "p4", "pool")),
    (14, (56, 56), ("p2", "p3", "p4", "p5", "pool")),
    (16, (64, 64), ("p2", "p3", "p4", "p5", "pool")),
    (16, (64, 96), ("p2", "p3", "p4", "p5", "pool")),  # not square
])
def test_pyramid_shapes_and_strides(patch, size, names):
    pyramid = SimpleFeaturePyramid(_vit(patch, size, reg_tokens=2), out_channels=24)
    spec = pyramid.spec
    assert spec.names == names and spec.channels == pyramid.out_channels == 24
    assert spec.strides == (patch / 4, patch / 2, patch, 2 * patch, 4 * patch)
    assert spec.num_prefix_tokens == 3 and spec.patch_size == patch and spec.roi_names == names[:-1]
    assert spec.size_divisibility % (4 * patch) == 0 and spec.power_of_two == (patch != 14)
    with torch.no_grad():
        features = pyramid(torch.randn(2, 3, *size))
    assert list(features) == list(names)
    for name, stride in zip(spec.names, spec.strides):
        expected = tuple(math.ceil(s / stride) for s in size)
        assert tuple(features[name].shape) == (2, 24, *expected), name


def test_pyramid_takes_the_last_blocks_patch_tokens():
    """p4 (scale 1) is a projection of the ViT's final, normed patch-token map: the class token plays no part."""
    vit = _vit(8, 32)
    pyramid = SimpleFeaturePyramid(vit, out_channels=16, scale_factors=(1.0,), top_block=None)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(images)[:, 1:]  # (B, 16, D) after the final norm
        expected = pyramid.stages["p3"](tokens.transpose(1, 2).reshape(1, 32, 4, 4))
        assert torch.allclose(pyramid(images)["p3"], expected, atol=1e-6)


def test_pyramid_pads_sizes_that_are_not_a_multiple_of_the_patch():
    pyramid = SimpleFeaturePyramid(_vit(8, 32, dynamic_img_size=True), out_channels=16)
    images = torch.randn(1, 3, 30, 27)
    padded = torch.zeros(1, 3, 32, 32)
    padded[..., :30, :27] = images
    with torch.no_grad():
        got, expected = pyramid(images), pyramid(padded)
    assert {k: tuple(v.shape[-2:]) for k, v in got.items()} == {"p1": (16, 16), "p2": (8, 8), "p3": (4, 4),
                                                               "p4": (2, 2), "pool": (1, 1)}
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    # a ViT built at 32 px (no dynamic size) takes a 25 px input: it is padded to its 32 px
    fixed = SimpleFeaturePyramid(_vit(8, 32), out_channels=16)
    assert fixed(torch.randn(1, 3, 25, 25))["p3"].shape[-2:] == (4, 4)
    assert pad_to_multiple(images, 4).shape[-2:] == (32, 28) and pad_to_multiple(padded, 8) is padded


def test_pretrained_weights_arrive_unchanged_in_the_pyramid(tmp_path):
    vit = _vit(8, 32, num_classes=5)
    with torch.no_grad():
        for param in vit.parameters():  # nothing left at an initial constant
            param.normal_()
    save_pretrained(vit, tmp_path / "tiny")
    built = Backbone(pretrained=str(tmp_path / "tiny"), dynamic_img_size=True).build(num_classes=0)
    pyramid = SimpleFeaturePyramid(built, out_channels=16)
    got = pyramid.vit.state_dict()
    expected = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_pyramid_optimiser_contracts_cover_every_parameter():
    pyramid = SimpleFeaturePyramid(_vit(8, 32), out_channels=16)
    names = {n for n, _ in pyramid.named_parameters()}
    ids = pyramid.layer_ids()
    assert set(ids) == names
    assert ids["vit.pos_embed"] == 0 and ids["stages.p1.0.weight"] == max(ids.values()) > ids["vit.blocks.1.attn.qkv.weight"]
    no_decay = pyramid.no_weight_decay()
    assert {"vit.pos_embed", "vit.cls_token", "stages.p1.1.weight", "stages.p1.0.bias"} <= no_decay
    assert "stages.p1.0.weight" not in no_decay and "stages.p1.4.weight" not in no_decay


def test_pyramid_refuses_impossible_settings():
    with pytest.raises(ValueError, match="scale_factors"):
        SimpleFeaturePyramid(_vit(8, 32), scale_factors=(3.0,))
    with pytest.raises(ValueError, match="out_channels"):
        SimpleFeaturePyramid(_vit(8, 32), out_channels=0)
    assert PyramidSpec(("a",), (3.5,), 8, 14, 1, 28).power_of_two is False


# ---- data --------------------------------------------------------------------------------------------------
def _mask_box(image: torch.Tensor) -> list[float]:
    rows, cols = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


@pytest.mark.parametrize("train", [True, False])
def test_a_drawn_box_lines_up_with_its_transformed_box(train):
    transform = detection_train_transform(48, scale_range=(0.6, 1.6)) if train else detection_eval_transform(48)
    checked = 0
    for seed in range(12):
        image = np.random.default_rng(seed).integers(0, 40, (50, 70, 3), dtype=np.uint8)
        box = [12.0, 9.0, 41.0, 30.0]
        image[9:30, 12:41] = 255
        seed_transform(transform, seed)
        out = transform(image=image, bboxes=np.array([box]), labels=[2])
        if len(out["bboxes"]) == 0:  # cropped away (train only)
            assert train
            continue
        got = [float(v) for v in out["bboxes"][0]]
        assert out["labels"] == [2]
        assert np.allclose(_mask_box(out["image"]), got, atol=1.0), (seed, got)
        checked += 1
    assert checked >= 6


def _coco_folder(tmp_path, records=None):
    records = records if records is not None else make_shapes(6, size=40, seed=1)
    for split in ("train", "val"):
        write_coco(records, ["square", "circle", "triangle"], tmp_path / "coco", split)
    return tmp_path / "coco", records


def _corrupt(root, kind):
    """Add one bad annotation (or image) of ``kind`` to the val file; returns (annotation id or None, problem)."""
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    image = data["images"][0]
    bad = {"id": 999, "image_id": image["id"], "category_id": 1, "iscrowd": 0, "area": 1}
    if kind == "outside":
        bad["bbox"], problem = [image["width"] + 5, 2, 6, 6], "lies outside"
    elif kind == "zero_size":
        bad["bbox"], problem = [3, 3, 0, 5], "zero or negative width or height"
    elif kind == "unknown_category":
        bad["bbox"], bad["category_id"], problem = [3, 3, 5, 5], 42, "unknown category 42"
    elif kind == "no_box":
        problem = "no box of four numbers"
    elif kind == "missing_image":
        data["images"].append({"id": 500, "file_name": "gone.png", "width": 10, "height": 10})
        bad, problem = None, "image file not found"
    else:  # unreadable
        (root / "val" / "broken.png").write_bytes(b"not a png at all")
        data["images"].append({"id": 501, "file_name": "broken.png", "width": 10, "height": 10})
        bad, problem = None, "unreadable image"
    if bad is not None:
        data["annotations"].append(bad)
    path.write_text(json.dumps(data))
    return (999 if bad is not None else None), problem


KINDS = ["outside", "zero_size", "unknown_category", "no_box", "missing_image", "unreadable"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_annotations_are_skipped_with_a_report(tmp_path, kind):
    root, records = _coco_folder(tmp_path)
    annotation_id, problem = _corrupt(root, kind)
    dm = DetectionDataModule("coco", root=str(root), img_size=40)
    with pytest.warns(UserWarning, match=r"skipped 1 unusable annotation"):
        dm.setup("fit")
    [entry] = dm.skipped_annotations
    assert entry.annotation_id == annotation_id and problem in entry.problem
    assert entry.file.endswith("instances_val.json")
    assert len(dm.val_set) == len(records)  # the good images all stay, their boxes unchanged
    assert sum(len(r.boxes) for r in dm.val_set.records) == sum(len(r.boxes) for r in records)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_annotations_raise_naming_file_id_and_problem(tmp_path, kind):
    root, _ = _coco_folder(tmp_path)
    annotation_id, problem = _corrupt(root, kind)
    dm = DetectionDataModule("coco", root=str(root), img_size=40, on_bad_annotation="error")
    with pytest.raises(BadAnnotationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "instances_val.json" in message and problem in message
    assert (f"annotation {annotation_id}" in message) if annotation_id else ("image" in message)


def test_boxes_partly_outside_are_clipped_and_listed(tmp_path):
    root, _ = _coco_folder(tmp_path)
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    image = data["images"][0]
    data["annotations"].append({"id": 777, "image_id": image["id"], "category_id": 2, "iscrowd": 0, "area": 1,
                                "bbox": [image["width"] - 4, -3, 10, 8]})
    path.write_text(json.dumps(data))
    dm = DetectionDataModule("coco", root=str(root), img_size=40, on_bad_annotation="error")
    with pytest.warns(UserWarning, match="clipped 1 box"):
        dm.setup("fit")
    assert [c.annotation_id for c in dm.clipped_annotations] == [777] and dm.skipped_annotations == []
    record = next(r for r in dm.val_set.records if r.image_id == image["id"])
    assert record.boxes[-1].tolist() == [image["width"] - 4, 0, image["width"], 5] and record.labels[-1] == 1


def test_shapes_survive_a_coco_round_trip(tmp_path):
    records = make_shapes(6, size=40, seed=1)
    records[0].boxes, records[0].labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)  # no boxes: valid
    root, _ = _coco_folder(tmp_path, records)
    back, categories = read_coco(root / "annotations" / "instances_train.json", root / "train")
    assert [c["name"] for c in categories] == ["square", "circle", "triangle"]
    assert len(back) == len(records)
    for a, b in zip(records, back):
        assert a.image_id == b.image_id and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    dm = DetectionDataModule("coco", root=str(root), img_size=40)
    dm.setup("fit")
    assert dm.class_names == ["square", "circle", "triangle"] and dm.num_classes == 3
    expected = DetectionDataset(records, detection_eval_transform(40))
    for i in range(len(records)):
        (image, target), (image2, target2) = dm.val_set[i], expected[i]
        assert torch.equal(image, image2) and target["boxes"].dtype == torch.float32
        assert all(torch.equal(target[k], target2[k]) for k in ("boxes", "labels", "image_id"))
    assert dm.val_set[0][1]["boxes"].shape == (0, 4)
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and targets[0]["labels"].dtype == torch.int64


def test_shapes_are_seeded_and_boxes_are_exact():
    a, b = make_shapes(5, 48, seed=7), make_shapes(5, 48, seed=7)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes) for x, y in zip(a, b))
    assert sum(len(r.boxes) for r in a) > 0
    dm = DetectionDataModule("shapes", img_size=48, num_images=16, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 16
    first = [t["boxes"] for t in next(iter(dm.train_dataloader()))[1]]
    again = [t["boxes"] for t in next(iter(dm.train_dataloader()))[1]]
    assert all(torch.equal(x, y) for x, y in zip(first, again))  # augmentation seeded too


def test_a_resumed_data_module_continues_where_it_stopped():
    def batches(dm, epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [[t["image_id"].item() for t in targets] for _, targets in loader]

    dm = DetectionDataModule("shapes", img_size=32, num_images=24, batch_size=4, max_objects=1)
    dm.setup("fit")
    full = batches(dm, 1)
    resumed = DetectionDataModule("shapes", img_size=32, num_images=24, batch_size=4, max_objects=1)
    resumed.setup("fit")
    resumed.load_state_dict({"epoch": 1, "batches_done": 2})
    loader = resumed.train_dataloader()  # Lightning sets the epoch the checkpoint saved
    assert [[t["image_id"].item() for t in targets] for _, targets in loader] == full[2:]


def test_data_module_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="data.root: required"):
        DetectionDataModule("coco")
    with pytest.raises(ValueError, match="instances_train.json not found"):
        DetectionDataModule("coco", root=str(tmp_path))
    with pytest.raises(ValueError, match="data.scale_range"):
        DetectionDataModule(scale_range=(2.0, 1.0))


# ---- the task ----------------------------------------------------------------------------------------------
def _detector(**kwargs) -> ObjectDetector:
    torch.manual_seed(0)
    backbone = Backbone(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return ObjectDetector(backbone, num_classes=3, class_names=["square", "circle", "triangle"], out_channels=32,
                          representation_size=64, **kwargs)


class _Losses(L.Callback):
    def __init__(self):
        self.losses, self.terms = [], set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.terms |= {k for k in trainer.callback_metrics if k.startswith("train/")}


def test_a_tiny_detector_learns_the_shapes_and_logs_map(tmp_path):
    dm = DetectionDataModule("shapes", img_size=64, num_images=30, batch_size=4, val_fraction=0.1, test_fraction=0.1)
    module = _detector(lr=2e-3, warmup_epochs=0.0, roi_batch_size=128)
    recorder = _Losses()
    trainer = L.Trainer(max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    first, last = np.mean(recorder.losses[:4]), np.mean(recorder.losses[-4:])
    assert last < 0.8 * first, recorder.losses
    assert {"train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_objectness",
            "train/loss_rpn_box_reg"} <= recorder.terms
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/map"]) <= 1.0 and {"val/map_50", "val/map_75", "val/mar_100"} <= set(metrics)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = ObjectDetector.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.class_names == ["square", "circle", "triangle"]
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), module.state_dict().values()))


def _coco_eval(targets, predictions) -> list[float]:
    """pycocotools' COCOeval on the same boxes: [map, map_50, map_75]."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, annotations, results = [], [], []
    for image_id, (target, prediction) in enumerate(zip(targets, predictions)):
        images.append({"id": image_id, "width": 64, "height": 64})
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for (x0, y0, x1, y1), label, score in zip(prediction["boxes"].tolist(), prediction["labels"].tolist(),
                                                  prediction["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": label - 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k, "name": str(k)} for k in range(3)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return [float(v) for v in evaluation.stats[:3]]


class _Fixed(torch.nn.Module):
    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def forward(self, images):
        return self.predictions[:len(images)]


def test_map_equals_pycocotools_on_hand_made_predictions():
    """The module's own path (label shift, metric, logging names) against COCOeval on the same boxes."""
    generator = torch.Generator().manual_seed(0)
    targets, predictions = [], []
    for image in range(5):
        n = image % 3 + 1
        xy = torch.rand(n, 2, generator=generator) * 40
        boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=generator) * 16], dim=1)
        labels = torch.randint(0, 3, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        # predictions: jittered true boxes (some misclassified, one missed), plus false positives; detector labels
        keep = slice(0, n - (image == 2))
        found = boxes[keep] + torch.randn(boxes[keep].shape, generator=generator) * 2
        wrong = (labels[keep] + (torch.rand(found.shape[0], generator=generator) < 0.2).long()) % 3
        false = torch.rand(2, 2, generator=generator) * 40
        predictions.append({"boxes": torch.cat([found, torch.cat([false, false + 10], 1)]),
                            "labels": torch.cat([wrong, torch.randint(0, 3, (2,), generator=generator)]) + 1,
                            "scores": torch.rand(found.shape[0] + 2, generator=generator)})
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})  # an image without boxes
    predictions.append({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1]),
                        "scores": torch.tensor([0.9])})
    module = _detector()
    module.detector = _Fixed(predictions)  # the heads' output, label 0 = background
    module.validation_step((list(torch.zeros(len(targets), 3, 64, 64)), targets), 0)
    ours = module.epoch_map(module.val_map, "val")
    expected = _coco_eval(targets, predictions)
    assert [ours["val/map"], ours["val/map_50"], ours["val/map_75"]] == pytest.approx(expected, abs=1e-6)
    assert 0 < expected[0] < 1  # neither trivial nor perfect


def test_detector_parameter_groups_and_settings():
    module = _detector(weight_decay=0.05)
    names = {n for n, p in module.named_parameters()}
    assert set(module.layer_ids()) == names
    no_decay = module.no_weight_decay()
    assert {"detector.backbone.vit.pos_embed", "detector.roi_heads.box_head.fc6.bias"} <= no_decay
    assert "detector.roi_heads.box_head.fc6.weight" not in no_decay
    decayed = Backbone(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, layer_decay=0.5)
    module = ObjectDetector(decayed, num_classes=3, out_channels=16, representation_size=32)
    from vit.training.optim import param_groups
    scales = {n: g["lr_scale"] for g in param_groups(module, 0.05, 0.5) for n in g["names"]}
    assert scales["detector.roi_heads.box_predictor.cls_score.weight"] == 1.0
    assert scales["detector.backbone.stages.p1.0.weight"] == 1.0
    assert scales["detector.backbone.vit.pos_embed"] < scales["detector.backbone.vit.blocks.1.attn.qkv.weight"] < 1
    with pytest.raises(ValueError, match="powers of two"):
        ObjectDetector(Backbone(img_size=56, patch_size=14, embed_dim=32, depth=1, num_heads=2), num_classes=2)
    with pytest.raises(ValueError, match="model.class_names has 1 names"):
        ObjectDetector(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=2,
                       class_names=["a"])


def test_pretrained_weights_arrive_unchanged_in_the_detector(tmp_path):
    vit = _vit(8, 64, num_classes=5)
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_()
    save_pretrained(vit, tmp_path / "tiny", mean=[0.5] * 3, std=[0.25] * 3)
    module = ObjectDetector(Backbone(pretrained=str(tmp_path / "tiny")), num_classes=2, out_channels=16,
                            representation_size=32)
    got = module.detector.backbone.vit.state_dict()
    assert all(torch.equal(got[k], v) for k, v in vit.state_dict().items() if not k.startswith("head."))
    assert module.detector.transform.image_mean == [0.5] * 3 and module.detector.transform.image_std == [0.25] * 3
    assert module.image_size == 64 and module.detector.transform.size_divisible == 32  # 4 x patch (the pool level)


RECIPE = Path(__file__).resolve().parents[2] / "configs" / "detection" / "shapes.yaml"
TINY_RUN = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--data.num_images", "32",
            "--data.batch_size", "8", "--data.num_workers", "0", "--model.backbone.embed_dim", "32",
            "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--model.out_channels", "32",
            "--model.representation_size", "64"]


def test_the_shapes_recipe_builds_through_the_training_cli(tmp_path):
    """`task: detection` picks ObjectDetector + DetectionDataModule; classes and image size come from the data."""
    from vit.training.cli import cli
    app = cli(["--config", str(RECIPE), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
               "--data.num_workers", "0"], run=False)
    assert isinstance(app.model, ObjectDetector) and isinstance(app.datamodule, DetectionDataModule)
    assert app.model.image_size == app.datamodule.img_size == 64
    assert app.model.class_names == app.datamodule.class_names and app.model.hparams.backbone["embed_dim"] == 128
    monitor = next(c for c in app.trainer.callbacks if type(c).__name__ == "LastCheckpoint").monitor
    assert monitor == "val/map"


def test_train_py_fits_and_tests_a_detector_and_reports_map(tmp_path, monkeypatch, capsys):
    """`python train.py --config configs/detection/shapes.yaml`: fit, test, one final line with the mAP; the
    checkpoints follow val/map and name it."""
    from vit.training.cli import main
    monkeypatch.chdir(tmp_path)
    app = main(["--config", str(RECIPE), *TINY_RUN])
    out = capsys.readouterr().out
    assert "shapes test mAP@50: " in out and "held-out images | wall time:" in out
    assert any("-map" in p.name for p in tmp_path.rglob("epoch*.ckpt"))
    assert 0 <= app.trainer.callback_metrics["test/map"] <= 1


def test_an_unknown_task_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from vit.training.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(RECIPE), "--task", "depth"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "task: expected one of classification, detection, " in message and "got 'depth'" in message
    assert "Traceback" not in message


def test_vit_predict_writes_coco_results_and_drawn_images_for_a_detection_checkpoint(tmp_path, monkeypatch, capsys):
    """`vit predict FOLDER --checkpoint DETECTOR.ckpt --out DIR`: predictions.json in COCO results style (boxes in
    the images' own pixels, image_id from --annotations), one PNG per image; a classifier's .ckpt still gives
    classes, and a bad threshold is one line with exit code 2."""
    from vit.commands.predict import main as predict_main
    from vit.data.coco import write_coco
    from vit.data.shapes import SHAPES_CLASSES, make_shapes
    from vit.training.cli import main
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPE), *TINY_RUN])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    write_coco(make_shapes(3, size=80, seed=5), SHAPES_CLASSES, tmp_path / "coco", "val")
    images = tmp_path / "coco" / "val"
    annotations = tmp_path / "coco" / "annotations" / "instances_val.json"
    capsys.readouterr()
    assert predict_main([str(images), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                         "--score-threshold", "0", "--annotations", str(annotations)]) == 0
    out = capsys.readouterr().out
    assert out.count(" boxes") == 3 and "wrote " in out
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    coco_images = json.loads(annotations.read_text())["images"]
    ids = {image["file_name"]: image["id"] for image in coco_images}
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco_images}
    assert results and {r["image_id"] for r in results} <= set(ids.values())
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert r["category_name"] == SHAPES_CLASSES[r["category_id"]] and 0 <= r["score"] <= 1
        # in the image's own pixels (the scenes are 70-100 px; the model ran at 64)
        assert -0.5 <= x and -0.5 <= y and w >= 0 and h >= 0 and x + w <= width + 0.5 and y + h <= height + 0.5
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        f"{Path(name).stem}.png" for name in ids)
    assert predict_main([str(images), "--checkpoint", str(ckpt), "--score-threshold", "2"]) == 2
    assert "--score-threshold" in capsys.readouterr().err


def _targets(dm, split="val"):
    dm.setup("fit")
    data = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]
    return [(r.boxes.round(3).tolist(), r.labels.tolist(), np.asarray(load_image_any(r)).sum()) for r in data.records]


def load_image_any(record):
    from vit.data.images import load_image
    return record.image if isinstance(record.image, np.ndarray) else load_image(record.image, 3)


def test_coco_voc_and_yolo_copies_of_one_set_give_identical_targets(tmp_path):
    from vit.data.coco import write_coco
    from vit.data.shapes import SHAPES_CLASSES, make_shapes
    from vit.data.voc import write_voc
    from vit.data.yolo import write_yolo
    records = make_shapes(12, size=64, seed=3)
    records[0].boxes, records[0].labels = records[0].boxes[:0], records[0].labels[:0]  # an image with no boxes
    for split, part in (("train", records[:8]), ("val", records[8:])):
        write_coco(part, SHAPES_CLASSES, tmp_path / "coco", split)
        write_voc(part, SHAPES_CLASSES, tmp_path / "voc", split)
        write_yolo(part, SHAPES_CLASSES, tmp_path / "yolo", split)
    (tmp_path / "voc" / "classes.txt").write_text("\n".join(SHAPES_CLASSES))
    modules = {kind: DetectionDataModule(kind, root=str(tmp_path / kind), img_size=64) for kind in ("coco", "voc",
                                                                                                   "yolo")}
    assert all(dm.class_names == list(SHAPES_CLASSES) for dm in modules.values())
    for split in ("train", "val"):
        coco = _targets(modules["coco"], split)
        assert len(coco) == (8 if split == "train" else 4) and any(boxes for boxes, _, _ in coco)
        assert split != "train" or coco[0][0] == []  # the image without boxes is kept
        assert _targets(modules["voc"], split) == coco  # same boxes (VOC's 1-based pixels undone), labels, pixels
        yolo = _targets(modules["yolo"], split)
        assert [(labels, pixels) for _, labels, pixels in yolo] == [(labels, pixels) for _, labels, pixels in coco]
        assert all(np.allclose(a, b, atol=1e-3) for (a, _, _), (b, _, _) in zip(yolo, coco) if a or b)
    assert modules["coco"].test_set.records == modules["coco"].val_set.records  # no test split: val doubles


def test_voc_and_yolo_bad_annotations_are_reported_like_cocos(tmp_path):
    from vit.data.shapes import SHAPES_CLASSES, make_shapes
    from vit.data.voc import write_voc
    from vit.data.yolo import write_yolo
    records = make_shapes(4, size=64, seed=4)
    for split in ("train", "val"):
        write_voc(records, SHAPES_CLASSES, tmp_path / "voc", split)
        write_yolo(records, SHAPES_CLASSES, tmp_path / "yolo", split)
    (tmp_path / "voc" / "classes.txt").write_text("\n".join(SHAPES_CLASSES))
    xml = tmp_path / "voc" / "Annotations" / "000000.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))  # an unknown class name
    label = tmp_path / "yolo" / "labels" / "train" / "000001.txt"
    label.write_text("7 0.5 0.5 0.2 0.2\nnot a box\n")  # a class index out of range, a broken line
    voc = DetectionDataModule("voc", root=str(tmp_path / "voc"), img_size=64)
    with pytest.warns(UserWarning, match="skipped 2 unusable"):  # the train and val copies of that object
        voc.setup("fit")
    assert all("unknown category 'xsquare'" in p.problem or "unknown category 'xcircle'" in p.problem or
               "unknown category 'xtriangle'" in p.problem for p in voc.skipped_annotations), voc.skipped_annotations
    yolo = DetectionDataModule("yolo", root=str(tmp_path / "yolo"), img_size=64)
    with pytest.warns(UserWarning, match="skipped 2 unusable"):
        yolo.setup("fit")
    problems = sorted(p.problem for p in yolo.skipped_annotations)
    assert "unknown category 8 (known: 1 square, 2 circle, 3 triangle)" in problems[1]
    assert "no box of four numbers" in problems[0]
    with pytest.raises(BadAnnotationError, match="000001.png: unknown category 8"):
        DetectionDataModule("yolo", root=str(tmp_path / "yolo"), img_size=64, on_bad_annotation="error").setup("fit")
    (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").unlink()
    with pytest.raises(ValueError, match="data.root: .*ImageSets/Main/train.txt not found"):
        DetectionDataModule("voc", root=str(tmp_path / "voc"))
