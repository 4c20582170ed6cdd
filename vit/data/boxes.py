"""Images with boxes, before any transform: the record every detection source (shapes, COCO) produces, and what a
left-out annotation reports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np



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
