"""DetectionDataModule: images with boxes for object detection: a synthetic ``shapes`` set or a COCO folder.

Targets are what torchvision's detectors take: ``boxes`` float32 (N, 4) xyxy in pixels of the transformed image,
``labels`` int64 in 0..K-1 (the index into ``class_names``). There is no background label here: a detector that
reserves one (Faster R-CNN's 0) shifts the labels itself, in its own module, so the offset lives in one place.
Images come out as float CHW tensors in [0, 1], not normalised: torchvision's detectors normalise inside the
model (``GeneralizedRCNNTransform``), and normalising here as well would do it twice.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from ..utils.ranges import Fraction, NonNegativeInt, PositiveInt, plain, range_problems
from .boxes import BadAnnotation, BadAnnotationError, DetectionRecord  # noqa: F401  (re-exported)
from .coco import coco_records, read_coco, write_coco  # noqa: F401  (write_coco: re-exported)
from .images import SkipLog, first_decodable, load_image
from .sampling import ResumableLoaders, seed_transform, split_index
from .shapes import SHAPES_CLASSES, make_shapes
from .voc import voc_as_coco, voc_class_names
from .yolo import yolo_as_coco, yolo_class_names

SPLITS = ("train", "val", "test")


# ---- transforms --------------------------------------------------------------------------------------------
def _bbox_params(min_visibility: float) -> A.BboxParams:
    # min width/height 1 px: torchvision's detectors refuse boxes without area
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility,
                        min_width=1.0, min_height=1.0)


def detection_train_transform(img_size: int, scale_range: Sequence[float] = (0.5, 1.5), hflip: bool = True,
                              min_visibility: float = 0.3) -> A.Compose:
    """Large-scale jitter as in ViTDet: the longer side resized to ``img_size``, scaled at random by a factor in
    ``scale_range``, padded (bottom/right, zeros) and cropped at random to ``img_size`` square, flipped; boxes
    follow, and those with less than ``min_visibility`` of their area left are dropped.

    Example:
        >>> t = detection_train_transform(32)
        >>> out = t(image=np.zeros((20, 40, 3), np.uint8), bboxes=np.array([[2, 2, 10, 10]], float), labels=[1])
        >>> out["image"].shape, out["image"].dtype
        (torch.Size([3, 32, 32]), torch.float32)
    """
    lo, hi = scale_range
    ops = [A.LongestMaxSize(max_size=img_size), A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
           A.PadIfNeeded(img_size, img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
           A.RandomCrop(img_size, img_size)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    ops += [A.ToFloat(max_value=255.0), ToTensorV2()]
    return A.Compose(ops, bbox_params=_bbox_params(min_visibility))


def detection_eval_transform(img_size: int) -> A.Compose:
    """The longer side resized to ``img_size``, padded bottom/right to ``img_size`` square (so boxes only scale).

    Example:
        >>> out = detection_eval_transform(32)(image=np.zeros((16, 64, 3), np.uint8),
        ...                                    bboxes=np.array([[0, 0, 64, 8]], float), labels=[0])
        >>> out["image"].shape, [round(float(v)) for v in out["bboxes"][0]]
        (torch.Size([3, 32, 32]), [0, 0, 32, 4])
    """
    return A.Compose([A.LongestMaxSize(max_size=img_size),
                      A.PadIfNeeded(img_size, img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
                      A.ToFloat(max_value=255.0), ToTensorV2()], bbox_params=_bbox_params(0.0))


# ---- datasets ----------------------------------------------------------------------------------------------
class DetectionDataset(Dataset):
    """Records decoded on access and transformed with their boxes: ``(image (3, H, W) float, target dict)``.

    A file that fails to decode raises ``BadImageError`` with ``on_bad_image="error"``; with ``"skip"`` the next
    record takes its place and the failure goes to ``skips``.
    """

    def __init__(self, records: Sequence[DetectionRecord], transform, on_bad_image: str = "error",
                 original_boxes: bool = False):
        self.records, self.transform, self.on_bad_image = list(records), transform, on_bad_image
        self.original_boxes = original_boxes
        self.skips = SkipLog()

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, j: int) -> np.ndarray:
        image = self.records[j].image
        return image if isinstance(image, np.ndarray) else load_image(image, 3)

    def __getitem__(self, item):
        i, sample_seed = split_index(item)
        j, image = first_decodable(i, len(self.records), self._decode, self.on_bad_image, self.skips,
                                   lambda k: self.records[k].name)
        record = self.records[j]
        height, width = image.shape[:2]
        boxes = record.boxes.reshape(-1, 4).astype(np.float32)
        boxes = np.clip(boxes, 0, [width, height, width, height])  # the file may be smaller than its JSON says
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], record.labels[keep]
        if sample_seed is not None:
            seed_transform(self.transform, sample_seed)
        if self.original_boxes:  # a whole-image box, transformed too, gives the exact scale of each axis
            boxes_in = np.concatenate([boxes, np.array([[0, 0, width, height]], np.float32)])
            out = self.transform(image=image, bboxes=boxes_in, labels=labels.tolist() + [-1])
            out_boxes, out_labels = np.asarray(out["bboxes"], np.float32).reshape(-1, 4), list(out["labels"])
            whole = out_boxes[out_labels.index(-1)]
            kept = [k for k, label in enumerate(out_labels) if label != -1]
            out = {**out, "bboxes": out_boxes[kept], "labels": [out_labels[k] for k in kept]}
        else:
            out = self.transform(image=image, bboxes=boxes, labels=labels.tolist())
        target = {"boxes": torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
                  "labels": torch.as_tensor(np.asarray(out["labels"], np.int64).reshape(-1)),
                  "image_id": torch.tensor(record.image_id)}
        if self.original_boxes:
            # evaluation in the image's own pixels (COCO's small/medium/large areas are defined there): the
            # boxes before the transform, and the factor that takes a prediction on the input back to them
            target["original_boxes"] = torch.as_tensor(boxes)
            target["original_labels"] = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))
            scale_x, scale_y = float(whole[2]) / width, float(whole[3]) / height
            target["scale"] = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)
        return out["image"], target


def detection_collate(batch):
    """A batch as torchvision's detectors take it: (list of image tensors, list of target dicts)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---- the data module ---------------------------------------------------------------------------------------
class DetectionDataModule(ResumableLoaders, L.LightningDataModule):
    """Images with boxes for object detection: ``shapes`` (synthetic, in memory, seeded) or ``coco`` (a folder).

    Targets: ``boxes`` float32 xyxy pixels, ``labels`` int64 in 0..K-1 (no background offset: the detector adds
    its own), ``image_id``. Images: float (3, img_size, img_size) in [0, 1], unnormalised (the model normalises).
    Batches are (list of images, list of targets). ``num_classes`` and ``class_names`` are known after
    construction. Images without boxes are valid samples.

    Args:
        dataset: "shapes" (squares, circles, triangles on textured backgrounds, generated from ``seed``) or "coco"
            (``root/annotations/instances_<split>.json`` with images in ``root/<split>/``).
        root: coco only: the COCO folder.
        img_size: side of the square images the transforms produce (the detector's input size).
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes; 0 = load in the main process.
        seed: seed of the shapes scenes, their split, the shuffling and the augmentation.
        num_images: shapes only: scenes generated, split by val_fraction and test_fraction.
        val_fraction: share held out for validation: of the shapes scenes, or of a folder's training images when it
            has no val split (carved by ``seed``, the same images every run).
        test_fraction: shapes only: share of the scenes held out for testing.
        max_objects: shapes only: most shapes in one scene.
        split_names: coco only: the file/folder name of each of train/val/test, e.g. {train: train2017, val: val2017};
            missing keys default to their own name; without a val split, val is carved from train
            (``val_fraction``); without a test split, val doubles as test.
        scale_range: training large-scale jitter: (min, max) factor on the image resized to img_size (ViTDet uses
            (0.1, 2.0) at 1024 px).
        hflip: flip training images horizontally at random.
        min_visibility: training boxes keeping less than this share of their area after the crop are dropped.
        on_bad_annotation: coco only: annotations that cannot be used (box outside its image, zero or negative
            width or height, unknown category or image id) and missing or unreadable images: "skip" (one warning
            with the count; each in ``skipped_annotations``) or "error" (raise naming file, annotation and problem).
            Boxes partly outside their image are clipped in both modes (listed in ``clipped_annotations``).

    Example:
        >>> dm = DetectionDataModule("shapes", img_size=32, num_images=8, batch_size=4)
        >>> dm.setup("fit"); images, targets = next(iter(dm.train_dataloader()))
        >>> dm.class_names, len(images), tuple(images[0].shape), sorted(targets[0])
        (['square', 'circle', 'triangle'], 4, (3, 32, 32), ['boxes', 'image_id', 'labels'])
    """

    def __init__(self, dataset: Literal["shapes", "coco", "voc", "yolo"] = "shapes", root: str | None = None,
                 img_size: int = 64,
                 batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 0, seed: int = 42,
                 num_images: PositiveInt = 256, val_fraction: Fraction = 0.125, test_fraction: Fraction = 0.125,
                 max_objects: NonNegativeInt = 4, split_names: dict[str, str] | None = None,
                 scale_range: tuple[float, float] = (0.1, 2.0), hflip: bool = True, min_visibility: Fraction = 0.3,
                 on_bad_annotation: Literal["skip", "error"] = "skip"):
        super().__init__()
        img_size, batch_size, num_workers, num_images, val_fraction, test_fraction, max_objects, min_visibility = \
            plain(img_size, batch_size, num_workers, num_images, val_fraction, test_fraction, max_objects,
                  min_visibility)
        scale_range = tuple(float(s) for s in scale_range)
        self.save_hyperparameters()
        _check_args(dataset=dataset, root=root, img_size=img_size, batch_size=batch_size, num_workers=num_workers,
                    num_images=num_images, val_fraction=val_fraction, test_fraction=test_fraction,
                    max_objects=max_objects, split_names=split_names, scale_range=scale_range,
                    min_visibility=min_visibility, on_bad_annotation=on_bad_annotation)
        self.dataset, self.img_size, self.batch_size, self.num_workers, self.seed = \
            dataset, img_size, batch_size, num_workers, seed
        self.root = Path(root).expanduser() if root else None
        self.split_names = {split: (split_names or {}).get(split, split) for split in SPLITS}
        self.on_bad_annotation = on_bad_annotation
        self.skipped_annotations: list[BadAnnotation] = []
        self.clipped_annotations: list[BadAnnotation] = []
        self._categories: list[dict] | None = None
        if dataset == "coco":
            data = json.loads(self._annotation_file("train").read_text(encoding="utf-8"))
            self._categories = sorted(data.get("categories", []), key=lambda c: c["id"])
            self.class_names = [str(c["name"]) for c in self._categories]
        elif dataset in ("voc", "yolo"):
            self.class_names = (voc_class_names(self.root, self.split_names["train"]) if dataset == "voc"
                                else yolo_class_names(self.root))
            self._categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names)]
        else:
            self.class_names = list(SHAPES_CLASSES)
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None
        self.test_set: DetectionDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        return detection_train_transform(self.img_size, hp.scale_range, hp.hflip, hp.min_visibility)

    def eval_transform(self) -> A.Compose:
        return detection_eval_transform(self.img_size)

    def _has_split(self, split: str) -> bool:
        name = self.split_names[split]
        if self.dataset == "voc":
            return (self.root / "ImageSets" / "Main" / f"{name}.txt").is_file()
        if self.dataset == "yolo":
            return (self.root / "images" / name).is_dir()
        return self._annotation_file(split).is_file()

    def _annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{self.split_names[split]}.json"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "shapes":
            records = make_shapes(self.hparams.num_images, self.img_size, self.seed, self.hparams.max_objects)
            order = np.random.default_rng(self.seed).permutation(len(records))
            n_val = int(round(len(records) * self.hparams.val_fraction))
            n_test = int(round(len(records) * self.hparams.test_fraction))
            val, test, train = np.split(order, [n_val, n_val + n_test])
            splits = {name: [records[i] for i in sorted(part)] for name, part in
                      (("train", train), ("val", val), ("test", test))}
        else:
            splits = self._read_coco_splits()
        on_bad_image = "skip" if self.on_bad_annotation == "skip" else "error"
        self.train_set = DetectionDataset(splits["train"], self.train_transform(), on_bad_image)
        self.val_set = DetectionDataset(splits["val"], self.eval_transform(), on_bad_image, original_boxes=True)
        self.test_set = DetectionDataset(splits["test"], self.eval_transform(), on_bad_image, original_boxes=True)
        image_log = self._report_skipped()
        for data in (self.train_set, self.val_set, self.test_set):
            data.skips.path = image_log

    def _read_coco_splits(self) -> dict[str, list[DetectionRecord]]:
        skipped, clipped = self.skipped_annotations, self.clipped_annotations
        splits = {}
        for split in SPLITS:
            if split == "val" and not self._has_split("val"):
                splits["train"], splits["val"] = self._carve_val(splits["train"])
                continue
            if split == "test" and not self._has_split("test"):
                splits["test"] = splits["val"]  # val doubles as test when there is no test split
                continue
            name = self.split_names[split]
            if self.dataset == "coco":
                records, _ = read_coco(self._annotation_file(split), self.root / name, self._categories, skipped,
                                       clipped, self.on_bad_annotation)
            else:
                data, image_dir = (voc_as_coco if self.dataset == "voc" else yolo_as_coco)(self.root, name,
                                                                                         self.class_names)
                source = str(self.root / ("ImageSets/Main" if self.dataset == "voc" else "labels") / name)
                records, _ = coco_records(data, source, image_dir, self._categories, skipped, clipped,
                                          self.on_bad_annotation)
            splits[split] = records
        if not splits["train"]:
            raise ValueError(f"data.root: no usable training images in the {self.dataset} folder {self.root}")
        return splits

    def _carve_val(self, records: list[DetectionRecord]) -> tuple[list[DetectionRecord], list[DetectionRecord]]:
        """(train, val): ``val_fraction`` of the records (at least one, seeded) held out for validation."""
        if len(records) < 2:
            raise ValueError(f"data.root: {self.root} has no val split and {len(records)} training image(s): "
                             f"need at least 2 to carve a validation set (data.val_fraction)")
        n_val = min(len(records) - 1, max(1, int(round(len(records) * self.hparams.val_fraction))))
        held = set(np.random.default_rng(self.seed).permutation(len(records))[:n_val].tolist())
        return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])

    def _report_skipped(self) -> Path | None:
        """One warning each for the annotations left out and the boxes clipped, every one listed in
        ``skipped_annotations.tsv`` in the run directory; returns the run's ``skipped_images.tsv`` (images that
        fail to decode later are appended there)."""
        trainer = getattr(self, "trainer", None)
        run_dir = Path(trainer.log_dir) if trainer is not None and trainer.log_dir else None
        listing = run_dir / "skipped_annotations.tsv" if run_dir else None
        items = [("skipped", b) for b in self.skipped_annotations] + [("clipped", b) for b in self.clipped_annotations]
        if listing is not None and items and trainer.is_global_zero:
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("action\tfile\tannotation_id\tproblem\n" + "".join(
                f"{action}\t{b.file}\t{'' if b.annotation_id is None else b.annotation_id}\t{b.problem}\n"
                for action, b in items), encoding="utf-8")
        where = f" (listed in {listing})" if listing is not None else ""
        skipped, clipped = self.skipped_annotations, self.clipped_annotations
        if skipped:
            first = skipped[0]
            warnings.warn(f"data: skipped {len(skipped)} unusable annotation(s) or image(s) under {self.root} "
                          f"(first: {first.file}, annotation {first.annotation_id}: {first.problem}){where}",
                          stacklevel=3)
        if clipped:
            warnings.warn(f"data: clipped {len(clipped)} box(es) reaching outside their image under {self.root} "
                          f"(first: {clipped[0].problem}){where}", stacklevel=3)
        return run_dir / "skipped_images.tsv" if run_dir else None

    def collate(self):
        return detection_collate


def _check_args(*, dataset, root, img_size, batch_size, num_workers, num_images, val_fraction, test_fraction,
                max_objects, split_names, scale_range, min_visibility, on_bad_annotation) -> None:
    problems = []
    if dataset not in ("shapes", "coco", "voc", "yolo"):
        problems.append(f"data.dataset: expected 'shapes', 'coco', 'voc' or 'yolo', got {dataset!r}")
    layouts = {"coco": ("a folder with annotations/instances_<split>.json and the images in <split>/",
                        lambda base, name: base / "annotations" / f"instances_{name}.json"),
               "voc": ("a folder with Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt",
                       lambda base, name: base / "ImageSets" / "Main" / f"{name}.txt"),
               "yolo": ("a folder with images/<split>/, labels/<split>/ and data.yaml or classes.txt",
                        lambda base, name: base / "images" / name)}
    if dataset in layouts:
        layout, where = layouts[dataset]
        if not root:
            problems.append(f"data.root: required for dataset {dataset!r} ({layout})")
        else:
            train = (split_names or {}).get("train", "train")  # without val, val is carved from train
            path = where(Path(root).expanduser(), train)
            if not path.exists():
                problems.append(f"data.root: {path} not found (the train split of a {dataset} folder: {layout})")
    elif root is not None:
        problems.append(f"data.root: only read by datasets coco, voc and yolo, got {root!r} with dataset {dataset!r}")
    if split_names is not None and set(split_names) - set(SPLITS):
        problems.append(f"data.split_names: unknown key(s) {sorted(set(split_names) - set(SPLITS))}; "
                        f"expected some of train, val, test")
    problems += range_problems("data", {
        "img_size": (PositiveInt, img_size), "batch_size": (PositiveInt, batch_size),
        "num_workers": (NonNegativeInt, num_workers), "num_images": (PositiveInt, num_images),
        "val_fraction": (Fraction, val_fraction), "test_fraction": (Fraction, test_fraction),
        "max_objects": (NonNegativeInt, max_objects), "min_visibility": (Fraction, min_visibility)})
    if val_fraction + test_fraction >= 1.0:
        problems.append(f"data.val_fraction + data.test_fraction must leave training data, got "
                        f"{val_fraction} + {test_fraction}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        problems.append(f"data.scale_range: expected (min, max) with 0 < min <= max, got {list(scale_range)}")
    if on_bad_annotation not in ("skip", "error"):
        problems.append(f"data.on_bad_annotation: expected 'skip' or 'error', got {on_bad_annotation!r}")
    if problems:
        raise ValueError("invalid data configuration:\n  " + "\n  ".join(problems))
