"""Pascal VOC detection folders: ``Annotations/<id>.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``, read
as COCO-shaped annotations (so ``coco_records`` checks them as it checks COCO files) and written back.

VOC boxes are 1-based pixel indices (xmin, ymin, xmax, ymax); as detectron2 does, xmin and ymin are taken 1 lower
so boxes are continuous pixel coordinates like COCO's. Objects marked ``difficult`` are left out (VOC's own
evaluation ignores them)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .boxes import BadAnnotationError, DetectionRecord


def voc_class_names(root: str | Path, split: str = "train") -> list[str]:
    """``root/classes.txt`` (one name per line) when present, else the sorted object names of ``split``."""
    root = Path(root)
    listed = root / "classes.txt"
    if listed.is_file():
        return [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = set()
    for xml in _xml_files(root, split):
        names |= {(obj.findtext("name") or "").strip() for obj in _parse(xml).iter("object")}
    return sorted(n for n in names if n)


def voc_as_coco(root: str | Path, split: str, class_names: Sequence[str]) -> tuple[dict, Path]:
    """A VOC split as COCO-shaped annotations (category ids 1..K in ``class_names`` order) and its image folder."""
    root = Path(root)
    category_id = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, xml in enumerate(_xml_files(root, split), start=1):
        tree = _parse(xml)
        size = tree.find("size")
        images.append({"id": image_id, "file_name": tree.findtext("filename") or f"{xml.stem}.jpg",
                       "width": int(float(size.findtext("width"))) if size is not None else 0,
                       "height": int(float(size.findtext("height"))) if size is not None else 0})
        for obj in tree.iter("object"):
            if (obj.findtext("difficult") or "0").strip() == "1":
                continue
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
            except (AttributeError, TypeError, ValueError):
                bbox = None  # reported by coco_records as a missing box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": bbox,
                                "category_id": category_id.get(name, name), "iscrowd": 0})  # a name: unknown
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}, root / "JPEGImages"


def write_voc(records: Sequence[DetectionRecord], class_names: Sequence[str], root: str | Path,
              split: str = "train") -> Path:
    """Write records with in-memory images as a VOC folder (PNG images); returns the split's list file."""
    from PIL import Image
    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for record in records:
        stem = f"{record.image_id:06d}"
        ids.append(stem)
        Image.fromarray(np.asarray(record.image)).save(root / "JPEGImages" / f"{stem}.png")
        height, width = record.image.shape[:2]
        objects = "".join(
            f"<object><name>{class_names[label]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
            f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for (x0, y0, x1, y1), label in zip(record.boxes.tolist(), record.labels.tolist()))
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>", encoding="utf-8")
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    return path


def _xml_files(root: Path, split: str) -> list[Path]:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"data.root: {listing} not found (a VOC folder lists each split's image ids there)")
    ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [root / "Annotations" / f"{i}.xml" for i in ids]


def _parse(xml: Path) -> ET.Element:
    try:
        return ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as err:
        raise BadAnnotationError(f"{xml}: cannot read the VOC annotation ({err})") from None
