"""Detection data beyond the basics: a val split carved from train, the skipped-annotations report in the run
directory, and evaluation targets in each image's own pixels."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vit.data.coco import write_coco
from vit.data.detection import DetectionDataModule
from vit.data.boxes import DetectionRecord
from vit.data.shapes import make_shapes
from vit.tasks.detection import ObjectDetector, _in_original_pixels

NAMES = ["square", "circle", "triangle"]


def _train_only(tmp_path, n=10):
    records = make_shapes(n, size=40, seed=3)
    write_coco(records, NAMES, tmp_path / "coco", "train")
    return tmp_path / "coco", records


def test_a_folder_without_val_has_val_carved_from_train_by_seed(tmp_path):
    root, records = _train_only(tmp_path)
    splits = []
    for seed in (0, 0, 1):
        dm = DetectionDataModule("coco", root=str(root), img_size=40, val_fraction=0.3, seed=seed)
        dm.setup("fit")
        train = {r.image_id for r in dm.train_set.records}
        val = {r.image_id for r in dm.val_set.records}
        assert len(val) == 3 and not train & val and len(train | val) == len(records)
        assert dm.test_set is dm.val_set or dm.test_set.records == dm.val_set.records  # val doubles as test
        splits.append(val)
    assert splits[0] == splits[1]  # the same images every run with one seed
    assert splits[0] != splits[2]


def test_a_folder_with_one_image_and_no_val_is_a_clear_error(tmp_path):
    root, _ = _train_only(tmp_path, n=1)
    dm = DetectionDataModule("coco", root=str(root), img_size=40)
    with pytest.raises(ValueError, match="no val split and 1 training image"):
        dm.setup("fit")


def test_the_default_jitter_is_vitdets_large_scale_range():
    assert tuple(DetectionDataModule().hparams.scale_range) == (0.1, 2.0)


def test_skipped_and_clipped_annotations_are_listed_in_the_run_directory(tmp_path):
    root, _ = _train_only(tmp_path)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    image = data["images"][0]
    data["annotations"] += [
        {"id": 901, "image_id": image["id"], "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [3, 3, 0, 5]},
        {"id": 902, "image_id": image["id"], "category_id": 2, "iscrowd": 0, "area": 1,
         "bbox": [image["width"] - 4, 1, 10, 8]}]
    path.write_text(json.dumps(data))
    dm = DetectionDataModule("coco", root=str(root), img_size=40)
    dm.trainer = SimpleNamespace(log_dir=str(tmp_path / "run"), is_global_zero=True)
    with pytest.warns(UserWarning, match=r"skipped 1 unusable annotation.*skipped_annotations\.tsv"):
        dm.setup("fit")
    lines = (tmp_path / "run" / "skipped_annotations.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["action", "file", "annotation_id", "problem"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], r[2]) for r in rows] == [("skipped", "901"), ("clipped", "902")]
    assert rows[0][1].endswith("instances_train.json") and "width or height" in rows[0][3]
    assert str(dm.train_set.skips.path).endswith("skipped_images.tsv")  # decode failures go beside it


def test_evaluation_targets_keep_the_boxes_in_the_images_own_pixels(tmp_path):
    image = np.zeros((100, 300, 3), np.uint8)
    boxes = np.array([[30, 10, 90, 70], [200, 50, 290, 95]], np.float32)
    record = DetectionRecord(image, boxes, np.array([0, 2]), image_id=7, name="wide.png")
    dm = DetectionDataModule(img_size=60)
    dm.setup("fit")
    dm.val_set.records = [record]
    _, target = dm.val_set[0]
    assert torch.allclose(target["scale"], torch.full((4,), 0.2))  # 300 px -> 60 px on both axes
    assert torch.equal(target["original_boxes"], torch.as_tensor(boxes))
    assert target["original_labels"].tolist() == [0, 2]
    assert torch.allclose(target["boxes"], torch.as_tensor(boxes) * 0.2, atol=1e-4)


def test_map_size_buckets_are_measured_in_original_pixels():
    """A 40x40 box (medium in COCO's original-pixel areas) shrunk to 8x8 on the input must still count as medium."""
    from torchmetrics.detection import MeanAveragePrecision

    scale = torch.full((4,), 0.2)
    original = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    target = {"boxes": original * scale, "labels": torch.tensor([1]), "scale": scale,
              "original_boxes": original, "original_labels": torch.tensor([1])}
    prediction = {"boxes": original * scale, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    preds, targets = _in_original_pixels([prediction], [target])
    assert torch.allclose(preds[0]["boxes"], original) and set(targets[0]) == {"boxes", "labels"}
    metric.update(preds, targets)
    result = metric.compute()
    assert float(result["map"]) == pytest.approx(1.0)
    assert float(result["map_medium"]) == pytest.approx(1.0) and float(result["map_small"]) == -1.0


def test_the_detector_validates_in_original_pixels(tmp_path):
    """End to end through validation_step: a box the detector cannot see at all still counts (as a miss), so
    the metric's ground truth is the file's, not what survived the resize."""
    from vit.tasks.backbone import Backbone

    torch.manual_seed(0)
    module = ObjectDetector(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=3,
                            out_channels=16, representation_size=32).eval()
    image = torch.rand(3, 32, 32)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "scale": torch.full((4,), 0.5), "original_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
              "original_labels": torch.tensor([0])}
    with torch.no_grad():
        module.validation_step(([image], [target]), 0)
    [seen] = module.val_map.groundtruth_labels
    assert seen.tolist() == [0]
