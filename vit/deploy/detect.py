"""Prediction with a detection checkpoint: boxes for image files, written as COCO-style results and drawn on the
images (what ``vit predict`` does when the checkpoint is an ``ObjectDetector``'s)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import load_image
from ..utils.files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_detection_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint of our ``ObjectDetector`` (its hyper-parameters name a detector).

    Example:
        >>> is_detection_checkpoint("my_vit/")  # a directory: save_pretrained's, never a detector's .ckpt
        False
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".ckpt":
        return False
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours to judge here: the classification loader reports it properly
        return False
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return isinstance(hparams, dict) and "detector" in hparams


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (searched recursively, sorted); a missing path is a FileNotFoundError."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, inputs))}")
    return files


def load_detector(path: str | Path):
    """The ``ObjectDetector`` of a Lightning checkpoint, in eval mode (read with ``weights_only=True``)."""
    from ..tasks.detection import ObjectDetector
    return ObjectDetector.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


@torch.inference_mode()
def detect(model, files: Sequence[Path], score_threshold: float = 0.05) -> list[list[dict[str, Any]]]:
    """Per image, its boxes as COCO results: ``bbox`` [x, y, width, height] in the image's own pixels (the model
    resizes inside and maps boxes back), ``category_id`` (the label index), ``category_name``, ``score``."""
    names = model.class_names or [str(i) for i in range(model.hparams.num_classes)]
    results = []
    for path in files:
        image = torch.from_numpy(load_image(path, 3)).permute(2, 0, 1).float().div(255)
        found = model([image])[0]
        keep = found["scores"] >= score_threshold
        entries = []
        for box, label, score in zip(found["boxes"][keep].tolist(), found["labels"][keep].tolist(),
                                     found["scores"][keep].tolist()):
            x0, y0, x1, y1 = box
            entries.append({"file_name": path.name, "category_id": int(label), "category_name": names[label],
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(float(score), 4)})
        results.append(entries)
    return results


def coco_image_ids(annotations: str | Path) -> dict[str, int]:
    """``file_name`` -> ``id`` of a COCO annotation file's images (its base name too, for images given by path)."""
    images = json.loads(Path(annotations).read_text(encoding="utf-8")).get("images", [])
    ids = {}
    for image in images:
        ids[str(image["file_name"])] = int(image["id"])
        ids.setdefault(Path(str(image["file_name"])).name, int(image["id"]))
    return ids


def write_predictions(files: Sequence[Path], results: Sequence[list[dict]], out: str | Path,
                      image_ids: dict[str, int] | None = None) -> Path:
    """``out/predictions.json`` (one COCO result per box; ``image_id`` when ``image_ids`` are given) and one PNG per
    image with its boxes, names and scores drawn; returns the JSON's path."""
    import cv2
    from PIL import Image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = []
    for path, entries in zip(files, results):
        image = np.array(load_image(path, 3))  # a writable copy to draw on
        for entry in entries:
            if image_ids is not None:
                if path.name not in image_ids:
                    raise ValueError(f"{path}: not among the images of the --annotations file")
                entry = {"image_id": image_ids[path.name], **entry}
            flat.append(entry)
            x, y, w, h = (int(round(v)) for v in entry["bbox"])
            cv2.rectangle(image, (x, y), (x + w, y + h), (255, 0, 0), 1)
            cv2.putText(image, f"{entry['category_name']} {entry['score']:.2f}", (x, max(y - 2, 8)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 0), 1, cv2.LINE_AA)
        Image.fromarray(image).save(out / f"{path.stem}.png")
    target = out / "predictions.json"
    with atomic_path(target, durable=False) as part:
        part.write_text(json.dumps(flat, indent=1), encoding="utf-8")
    return target
