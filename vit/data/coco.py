"""COCO detection folders: ``annotations/instances_<split>.json`` + images, read into detection records (bad
annotations reported or refused) and written back."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .boxes import BadAnnotation, BadAnnotationError, DetectionRecord
from .folder import check_images


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
    annotation_file = Path(annotation_file)
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadAnnotationError(f"{annotation_file}: cannot read the annotation file ({err})") from None
    return coco_records(data, str(annotation_file), image_dir, categories, problems, clipped, on_bad_annotation)


def coco_records(data: dict, source: str, image_dir: str | Path, categories: Sequence[dict] | None = None,
                 problems: list[BadAnnotation] | None = None, clipped: list[BadAnnotation] | None = None,
                 on_bad_annotation: str = "skip") -> tuple[list[DetectionRecord], list[dict]]:
    """``read_coco`` on annotations already in memory (COCO-shaped: ``images``, ``annotations``, ``categories``);
    ``source`` is what reports name (the file the annotations came from). VOC and YOLO folders are read through it,
    so every layout is checked the same way."""
    image_dir = Path(image_dir)
    problems = [] if problems is None else problems
    clipped = [] if clipped is None else clipped
    categories = sorted(data.get("categories", []), key=lambda c: c["id"]) if categories is None else categories
    label_of = {int(c["id"]): k for k, c in enumerate(categories)}

    def bad(annotation_id, problem):
        if on_bad_annotation == "error":
            what = f"annotation {annotation_id}" if annotation_id is not None else "image"
            raise BadAnnotationError(f"{source}: {what}: {problem}")
        problems.append(BadAnnotation(source, annotation_id, problem))

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
        category = ann.get("category_id")
        if not isinstance(category, (int, float)) or int(category) not in label_of:
            known = ", ".join(f"{c['id']} {c['name']}" for c in categories)
            bad(ann_id, f"{name}: unknown category {category!r} (known: {known})")
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
            clipped.append(BadAnnotation(source, ann_id, f"{name}: box {ann['bbox']} clipped to the "
                                                         f"{width:g}x{height:g} image"))
        boxes[image_id].append(box)
        labels[image_id].append(label_of[int(category)])
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
