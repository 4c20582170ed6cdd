"""Prediction with a detection checkpoint: boxes for image files, written as COCO-style results and drawn on the
images (what ``vit predict`` does when the checkpoint is an ``ObjectDetector``'s)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.folder import list_images
from ..data.images import load_image
from ..utils.files import atomic_path


def is_detection_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint of our ``ObjectDetector`` (its hyper-parameters name a detector).

    Example:
        >>> is_detection_checkpoint("my_vit/")  # a directory: save_pretrained's, never a detector's .ckpt
        False
    """
    return "detector" in checkpoint_hparams(path)


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyper-parameters of a Lightning ``.ckpt`` (which say the task it trained), or ``{}`` for anything else.

    Example:
        >>> checkpoint_hparams("my_vit/")
        {}
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".ckpt":
        return {}
    try:  # memory-mapped: the hyper-parameters are read, the tensors are not
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to judge here: the classification loader reports it properly
        return {}
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return hparams if isinstance(hparams, dict) else {}


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files, folders (recursive, sorted) and ``.txt`` lists, as ``data.predict_path`` reads them."""
    try:
        return [Path(p) for p in list_images([str(item) for item in inputs])]
    except (ValueError, FileNotFoundError) as err:  # named for the recipe key there; here they are arguments
        raise type(err)(str(err).removeprefix("data.predict_path: ")) from None


def load_detector(path: str | Path):
    """The ``ObjectDetector`` of a Lightning checkpoint, in eval mode (read with ``weights_only=True``)."""
    from ..tasks.detection import ObjectDetector
    return ObjectDetector.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


@torch.inference_mode()
def detect(model, image: np.ndarray, name: str, score_threshold: float = 0.05) -> list[dict[str, Any]]:
    """One HWC uint8 image's boxes as COCO results: ``bbox`` [x, y, width, height] in the image's own pixels (the
    model resizes inside and maps boxes back), ``category_id`` (the label index), ``category_name``, ``score``."""
    names = model.class_names or [str(i) for i in range(model.hparams.num_classes)]
    found = model([torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)])[0]
    keep = found["scores"] >= score_threshold
    entries = []
    for box, label, score in zip(found["boxes"][keep].tolist(), found["labels"][keep].tolist(),
                                 found["scores"][keep].tolist()):
        x0, y0, x1, y1 = box
        entries.append({"file_name": name, "category_id": int(label), "category_name": names[label],
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 4)})
    return entries


def draw_boxes(image: np.ndarray, entries: Sequence[dict[str, Any]]) -> np.ndarray:
    """A copy of ``image`` with each entry's box, name and score drawn."""
    import cv2
    image = np.array(image)  # a writable copy
    for entry in entries:
        x, y, w, h = (int(round(v)) for v in entry["bbox"])
        cv2.rectangle(image, (x, y), (x + w, y + h), (255, 0, 0), 1)
        cv2.putText(image, f"{entry['category_name']} {entry['score']:.2f}", (x, max(y - 2, 8)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 0), 1, cv2.LINE_AA)
    return image


def predict_boxes(model, files: Sequence[Path], out: str | Path, score_threshold: float = 0.05,
                  image_ids: dict[str, int] | None = None) -> tuple[list[list[dict[str, Any]]], Path]:
    """Each image decoded once: its boxes (``detect``), a PNG with them drawn in ``out``, and ``out/predictions.json``
    with every box (``image_id`` added when ``image_ids`` are given); returns the boxes per image and the JSON's
    path."""
    from PIL import Image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, flat = [], []
    for path in files:
        if image_ids is not None and path.name not in image_ids:
            raise ValueError(f"{path}: not among the images of the --annotations file")
        image = load_image(path, 3)
        entries = detect(model, image, path.name, score_threshold)
        Image.fromarray(draw_boxes(image, entries)).save(out / f"{path.stem}.png")
        results.append(entries)
        flat += [{"image_id": image_ids[path.name], **e} if image_ids is not None else e for e in entries]
    target = out / "predictions.json"
    with atomic_path(target, durable=False) as part:
        part.write_text(json.dumps(flat, indent=1), encoding="utf-8")
    return results, target


def coco_image_ids(annotations: str | Path) -> dict[str, int]:
    """``file_name`` -> ``id`` of a COCO annotation file's images (its base name too, for images given by path)."""
    images = json.loads(Path(annotations).read_text(encoding="utf-8")).get("images", [])
    ids = {}
    for image in images:
        ids[str(image["file_name"])] = int(image["id"])
        ids.setdefault(Path(str(image["file_name"])).name, int(image["id"]))
    return ids
