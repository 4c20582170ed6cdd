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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from ..utils.ranges import Fraction, NonNegativeInt, PositiveInt, plain, range_problems
from .folder import check_images
from .images import BadImageError, SkipLog, load_image
from .sampling import EpochSampler, process_share, seed_transform, split_index, training_position

SHAPES_CLASSES = ("square", "circle", "triangle")
SPLITS = ("train", "val", "test")


@dataclass
class DetectionRecord:
    """One image and its boxes before any transform: ``image`` is a file path or an HWC uint8 array."""
    image: str | np.ndarray
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64, 0..K-1
    image_id: int
    name: str  # what messages call the image (its file name)


class BadAnnotation(NamedTuple):
    """A COCO annotation (or image) left out: the annotation file, the annotation id (None: a whole image) and why."""
    file: str
    annotation_id: int | None
    problem: str


class BadAnnotationError(ValueError):
    """An annotation that cannot be used, with ``on_bad_annotation: error`` (file, annotation id and problem)."""


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

    def __init__(self, records: Sequence[DetectionRecord], transform, on_bad_image: str = "error"):
        self.records, self.transform, self.on_bad_image = list(records), transform, on_bad_image
        self.skips = SkipLog()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        i, sample_seed = split_index(item)
        for attempt in range(min(len(self.records), 16)):
            record = self.records[(i + attempt) % len(self.records)]
            try:
                image = record.image if isinstance(record.image, np.ndarray) else load_image(record.image, 3)
                break
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise
                self.skips.record(err)
        else:
            raise BadImageError(self.records[i].name, "this and the following images could not be decoded")
        height, width = image.shape[:2]
        boxes = record.boxes.reshape(-1, 4).astype(np.float32)
        boxes = np.clip(boxes, 0, [width, height, width, height])  # the file may be smaller than its JSON says
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if sample_seed is not None:
            seed_transform(self.transform, sample_seed)
        out = self.transform(image=image, bboxes=boxes[keep], labels=record.labels[keep].tolist())
        target = {"boxes": torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
                  "labels": torch.as_tensor(np.asarray(out["labels"], np.int64).reshape(-1)),
                  "image_id": torch.tensor(record.image_id)}
        return out["image"], target


def detection_collate(batch):
    """A batch as torchvision's detectors take it: (list of image tensors, list of target dicts)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---- the synthetic shapes set ------------------------------------------------------------------------------
def make_shapes(num_images: int, size: int = 64, seed: int = 0, max_objects: int = 4) -> list[DetectionRecord]:
    """Seeded scenes of coloured squares, circles and triangles on textured backgrounds, boxes exact (each box is
    the extent of the shape's own pixels; shapes never overlap). Sizes vary around ``size``; some scenes are empty.

    Example:
        >>> scene = make_shapes(1, size=48, seed=3)[0]
        >>> scene.image.dtype, scene.boxes.shape[1], set(scene.labels.tolist()) <= {0, 1, 2}
        (dtype('uint8'), 4, True)
    """
    rng = np.random.default_rng(seed)
    return [_scene(rng, size, max_objects, i) for i in range(num_images)]


def _scene(rng: np.random.Generator, size: int, max_objects: int, index: int) -> DetectionRecord:
    height, width = (int(s) for s in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
    # texture: smooth random blobs plus stripes, dark, so shapes stand out without being trivial
    coarse = rng.integers(0, 90, (4, 4, 3)).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    stripes = ((np.arange(width)[None, :] + np.arange(height)[:, None]) // max(2, size // 16)) % 2
    image = np.clip(image.astype(np.int16) + 25 * stripes[..., None] + rng.integers(-10, 11, image.shape), 0, 255)
    image = image.astype(np.uint8)
    taken = np.zeros((height, width), bool)
    boxes, labels = [], []
    for _ in range(int(rng.integers(0, max_objects + 1))):
        for _try in range(20):
            label = int(rng.integers(len(SHAPES_CLASSES)))
            side = int(rng.integers(max(6, size // 6), max(7, size // 3) + 1))
            if side >= min(height, width):
                continue
            y0, x0 = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
            mask = np.zeros((height, width), np.uint8)
            if label == 0:
                mask[y0:y0 + side, x0:x0 + side] = 1
            elif label == 1:
                radius = side // 2
                cv2.circle(mask, (x0 + radius, y0 + radius), radius, 1, thickness=-1)
            else:
                points = np.array([[x0 + side // 2, y0], [x0, y0 + side - 1], [x0 + side - 1, y0 + side - 1]])
                cv2.fillPoly(mask, [points.astype(np.int32)], 1)
            mask = mask.astype(bool)
            rows, cols = np.nonzero(mask)
            box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            if taken[max(0, box[1] - 1):box[3] + 1, max(0, box[0] - 1):box[2] + 1].any():
                continue  # never overlapping (nor touching): every box is exactly its shape's pixels
            image[mask] = rng.integers(140, 256, 3).astype(np.uint8)
            taken |= mask
            boxes.append(box)
            labels.append(label)
            break
    return DetectionRecord(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                           image_id=index, name=f"shapes[{index}]")


# ---- COCO --------------------------------------------------------------------------------------------------
def read_coco(annotation_file: str | Path, image_dir: str | Path, categories: Sequence[dict] | None = None,
              problems: list[BadAnnotation] | None = None, clipped: list[BadAnnotation] | None = None,
              on_bad_annotation: str = "skip") -> tuple[list[DetectionRecord], list[dict]]:
    """Records of a COCO ``instances_*.json`` with images under ``image_dir``, and its categories (sorted by id;
    label k is the k-th, or the k-th of ``categories`` when given, e.g. the training file's).

    Boxes reaching outside their image are clipped to it (and listed in ``clipped``); annotations that cannot be
    used (box entirely outside, zero or negative width/height, unknown category or image id) and images that are
    missing or unreadable are appended to ``problems`` (``skip``) or raise ``BadAnnotationError`` (``error``).
    Crowd annotations (``iscrowd: 1``) are left out: the detectors here train on single objects.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    problems = [] if problems is None else problems
    clipped = [] if clipped is None else clipped
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadAnnotationError(f"{annotation_file}: cannot read the annotation file ({err})") from None
    categories = sorted(data.get("categories", []), key=lambda c: c["id"]) if categories is None else categories
    label_of = {int(c["id"]): k for k, c in enumerate(categories)}

    def bad(annotation_id, problem):
        if on_bad_annotation == "error":
            what = f"annotation {annotation_id}" if annotation_id is not None else "image"
            raise BadAnnotationError(f"{annotation_file}: {what}: {problem}")
        problems.append(BadAnnotation(str(annotation_file), annotation_id, problem))

    images = {int(im["id"]): im for im in data.get("images", [])}
    files = {i: image_dir / im["file_name"] for i, im in images.items()}
    present = {i: p for i, p in files.items() if p.is_file()}
    unreadable = check_images(image_dir, present.values()) if present else {}
    usable = set()
    for image_id, path in files.items():
        if image_id not in present:
            bad(None, f"{images[image_id]['file_name']}: image file not found ({path})")
        elif str(path) in unreadable:
            bad(None, f"{images[image_id]['file_name']}: unreadable image ({unreadable[str(path)]})")
        else:
            usable.add(image_id)
    boxes: dict[int, list] = {i: [] for i in usable}
    labels: dict[int, list] = {i: [] for i in usable}
    for ann in data.get("annotations", []):
        ann_id, image_id = ann.get("id"), int(ann.get("image_id", -1))
        if ann.get("iscrowd", 0):
            continue
        if image_id not in images:
            bad(ann_id, f"unknown image id {image_id}")
            continue
        if image_id not in usable:
            continue  # its image is already reported
        name = images[image_id]["file_name"]
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            bad(ann_id, f"{name}: no box of four numbers [x, y, width, height] (got {ann.get('bbox')!r})")
            continue
        if int(ann.get("category_id", -1)) not in label_of:
            bad(ann_id, f"{name}: unknown category id {ann.get('category_id')} (known: {sorted(label_of)})")
            continue
        if not (w > 0 and h > 0):
            bad(ann_id, f"{name}: box {ann['bbox']} has zero or negative width or height")
            continue
        width, height = float(images[image_id]["width"]), float(images[image_id]["height"])
        box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
        if not (box[2] > box[0] and box[3] > box[1]):
            bad(ann_id, f"{name}: box {ann['bbox']} lies outside the {width:g}x{height:g} image")
            continue
        if box != [x, y, x + w, y + h]:
            clipped.append(BadAnnotation(str(annotation_file), ann_id, f"{name}: box {ann['bbox']} clipped to "
                                                                        f"the {width:g}x{height:g} image"))
        boxes[image_id].append(box)
        labels[image_id].append(label_of[int(ann["category_id"])])
    records = [DetectionRecord(str(files[i]), np.asarray(boxes[i], np.float32).reshape(-1, 4),
                               np.asarray(labels[i], np.int64), image_id=i, name=images[i]["file_name"])
               for i in sorted(usable)]
    return records, list(categories)


def write_coco(records: Sequence[DetectionRecord], class_names: Sequence[str], root: str | Path,
               split: str = "train") -> Path:
    """Write records with in-memory images as a COCO folder: ``root/<split>/<id>.png`` and
    ``root/annotations/instances_<split>.json`` (category ids 1..K, boxes [x, y, w, h]). Returns the JSON path."""
    from PIL import Image
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for record in records:
        name = f"{record.image_id:06d}.png"
        Image.fromarray(np.asarray(record.image)).save(root / split / name)
        height, width = record.image.shape[:2]
        images.append({"id": int(record.image_id), "file_name": name, "width": int(width), "height": int(height)})
        for (x0, y0, x1, y1), label in zip(record.boxes.tolist(), record.labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": int(record.image_id),
                                "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}),
                    encoding="utf-8")
    return path


# ---- the data module ---------------------------------------------------------------------------------------
class DetectionDataModule(L.LightningDataModule):
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
        val_fraction: shapes only: share of the scenes held out for validation.
        test_fraction: shapes only: share of the scenes held out for testing.
        max_objects: shapes only: most shapes in one scene.
        split_names: coco only: the file/folder name of each of train/val/test, e.g. {train: train2017, val: val2017};
            missing keys default to their own name; without a test file, val doubles as test.
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

    def __init__(self, dataset: Literal["shapes", "coco"] = "shapes", root: str | None = None, img_size: int = 64,
                 batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 0, seed: int = 42,
                 num_images: PositiveInt = 256, val_fraction: Fraction = 0.125, test_fraction: Fraction = 0.125,
                 max_objects: NonNegativeInt = 4, split_names: dict[str, str] | None = None,
                 scale_range: tuple[float, float] = (0.5, 1.5), hflip: bool = True, min_visibility: Fraction = 0.3,
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
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a resumed checkpoint
        if dataset == "coco":
            data = json.loads(self._annotation_file("train").read_text(encoding="utf-8"))
            self._categories = sorted(data.get("categories", []), key=lambda c: c["id"])
            self.class_names = [str(c["name"]) for c in self._categories]
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
        self.val_set = DetectionDataset(splits["val"], self.eval_transform(), on_bad_image)
        self.test_set = DetectionDataset(splits["test"], self.eval_transform(), on_bad_image)

    def _read_coco_splits(self) -> dict[str, list[DetectionRecord]]:
        skipped, clipped = self.skipped_annotations, self.clipped_annotations
        splits = {}
        for split in SPLITS:
            path = self._annotation_file(split)
            if split == "test" and not path.is_file():
                splits["test"] = splits["val"]  # val doubles as test when there is no test file
                continue
            records, _ = read_coco(path, self.root / self.split_names[split], self._categories, skipped, clipped,
                                   self.on_bad_annotation)
            splits[split] = records
        if skipped:
            first = skipped[0]
            warnings.warn(f"data: skipped {len(skipped)} unusable annotation(s) or image(s) under {self.root} "
                          f"(first: {first.file}, annotation {first.annotation_id}: {first.problem}); all are in "
                          f"skipped_annotations", stacklevel=2)
        if clipped:
            warnings.warn(f"data: clipped {len(clipped)} box(es) reaching outside their image under {self.root} "
                          f"(first: {clipped[0].problem}); all are in clipped_annotations", stacklevel=2)
        if not splits["train"]:
            raise ValueError(f"data.root: no usable training images in {self._annotation_file('train')}")
        return splits

    # ---- loaders ---------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # shuffle order and augmentation are functions of (seed, epoch, position), as in ImageDataModule
        sampler = EpochSampler(len(dataset), self.seed, **self._process_share()) if shuffle else None
        if sampler is not None and self._resume_at is not None:  # a resumed run skips what it has trained on
            sampler.start_at(self._resume_at[0], self._resume_at[1] * self.batch_size)
            self._resume_at = None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=detection_collate, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))

    def _process_share(self) -> dict:
        return process_share(self)

    # ---- resuming (as ImageDataModule: the position in the data is saved in every checkpoint) ----------------
    def state_dict(self) -> dict:
        return training_position(self)

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches_done"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _check_args(*, dataset, root, img_size, batch_size, num_workers, num_images, val_fraction, test_fraction,
                max_objects, split_names, scale_range, min_visibility, on_bad_annotation) -> None:
    problems = []
    if dataset not in ("shapes", "coco"):
        problems.append(f"data.dataset: expected 'shapes' or 'coco', got {dataset!r}")
    if dataset == "coco":
        if not root:
            problems.append("data.root: required for dataset 'coco' (a folder with annotations/instances_<split>.json "
                            "and the images in <split>/)")
        else:
            names = {split: (split_names or {}).get(split, split) for split in SPLITS}
            for split in ("train", "val"):
                path = Path(root).expanduser() / "annotations" / f"instances_{names[split]}.json"
                if not path.is_file():
                    problems.append(f"data.root: {path} not found (the {split} annotations)")
    elif root is not None:
        problems.append(f"data.root: only read by dataset 'coco', got {root!r} with dataset {dataset!r}")
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
