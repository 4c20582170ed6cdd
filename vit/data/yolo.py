"""YOLO detection folders: ``images/<split>/``, ``labels/<split>/<stem>.txt`` (``class cx cy w h``, normalised
to the image), class names from ``data.yaml`` (``names``) or ``classes.txt``; read as COCO-shaped annotations (so
``coco_records`` checks them as it checks COCO files) and written back. An image without a label file has no
boxes (a valid training image)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from .boxes import DetectionRecord
from .images import IMAGE_EXTENSIONS


def yolo_class_names(root: str | Path) -> list[str]:
    """``names`` of ``root/data.yaml`` (a list, or a mapping from index to name), else ``root/classes.txt``."""
    root = Path(root)
    if (root / "data.yaml").is_file():
        names = (yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8")) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    if (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    raise FileNotFoundError(f"data.root: {root} has neither data.yaml with names nor classes.txt (the class names "
                            f"of a YOLO folder)")


def yolo_as_coco(root: str | Path, split: str, class_names: Sequence[str]) -> tuple[dict, Path]:
    """A YOLO split as COCO-shaped annotations (category ids 1..K in ``class_names`` order) and its image folder."""
    from PIL import Image
    root = Path(root)
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"data.root: {image_dir} not found (a YOLO folder has images/<split>/)")
    images, annotations = [], []
    for image_id, path in enumerate(sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                                    start=1):
        try:
            with Image.open(path) as image:  # the header only
                width, height = image.size
        except OSError:
            width = height = 0  # reported as unreadable by coco_records
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        labels = root / "labels" / split / f"{path.stem}.txt"
        for line in labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []:
            if not line.strip():
                continue
            parts = line.split()
            try:
                label, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:])
                bbox, category = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], label + 1
            except ValueError:
                bbox, category = None, None  # reported by coco_records (so is a class index out of range)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": bbox,
                                "category_id": category, "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}, image_dir


def write_yolo(records: Sequence[DetectionRecord], class_names: Sequence[str], root: str | Path,
               split: str = "train") -> Path:
    """Write records with in-memory images as a YOLO folder (PNG images, data.yaml); returns the labels folder."""
    from PIL import Image
    root = Path(root)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": list(class_names)}), encoding="utf-8")
    for record in records:
        stem = f"{record.image_id:06d}"
        Image.fromarray(np.asarray(record.image)).save(root / "images" / split / f"{stem}.png")
        height, width = record.image.shape[:2]
        lines = [f"{label} {(x0 + x1) / 2 / width!r} {(y0 + y1) / 2 / height!r} {(x1 - x0) / width!r} "
                 f"{(y1 - y0) / height!r}"
                 for (x0, y0, x1, y1), label in zip(record.boxes.tolist(), record.labels.tolist())]
        (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "labels" / split
