"""The synthetic shapes set: seeded scenes of squares, circles and triangles on textured backgrounds, with exact
boxes, generated in memory (the detection default: no download). The same scenes come with per-pixel labels for
segmentation (``make_shape_masks``): 0 is the background, shape class k is k + 1."""
from __future__ import annotations

import cv2
import numpy as np

from .boxes import DetectionRecord

SHAPES_CLASSES = ("square", "circle", "triangle")
SHAPES_SEGMENTATION_CLASSES = ("background", *SHAPES_CLASSES)


def make_shapes(num_images: int, size: int = 64, seed: int = 0, max_objects: int = 4) -> list[DetectionRecord]:
    """Seeded scenes of coloured squares, circles and triangles on textured backgrounds, boxes exact (each box is
    the extent of the shape's own pixels; shapes never overlap). Sizes vary around ``size``; some scenes are empty.

    Example:
        >>> scene = make_shapes(1, size=48, seed=3)[0]
        >>> scene.image.dtype, scene.boxes.shape[1], set(scene.labels.tolist()) <= {0, 1, 2}
        (dtype('uint8'), 4, True)
    """
    rng = np.random.default_rng(seed)
    return [_scene(rng, size, max_objects, i)[0] for i in range(num_images)]


def make_shape_masks(num_images: int, size: int = 64, seed: int = 0,
                     max_objects: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """The scenes of ``make_shapes`` (same arguments, same images) as ``(image HWC uint8, mask HW uint8)`` pairs: each
    mask pixel is 0 (background) or shape class + 1, the index into ``SHAPES_SEGMENTATION_CLASSES``.

    Example:
        >>> image, mask = make_shape_masks(1, size=48, seed=3)[0]
        >>> image.shape[:2] == mask.shape, set(np.unique(mask).tolist()) <= {0, 1, 2, 3}
        (True, True)
        >>> bool((image == make_shapes(1, size=48, seed=3)[0].image).all())
        True
    """
    rng = np.random.default_rng(seed)
    scenes = [_scene(rng, size, max_objects, i) for i in range(num_images)]
    return [(record.image, mask) for record, mask in scenes]


def _scene(rng: np.random.Generator, size: int, max_objects: int,
           index: int) -> tuple[DetectionRecord, np.ndarray]:
    height, width = (int(s) for s in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
    # texture: smooth random blobs plus stripes, dark, so shapes stand out without being trivial
    coarse = rng.integers(0, 90, (4, 4, 3)).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    stripes = ((np.arange(width)[None, :] + np.arange(height)[:, None]) // max(2, size // 16)) % 2
    image = np.clip(image.astype(np.int16) + 25 * stripes[..., None] + rng.integers(-10, 11, image.shape), 0, 255)
    image = image.astype(np.uint8)
    taken = np.zeros((height, width), bool)
    classes = np.zeros((height, width), np.uint8)  # per-pixel labels: 0 background, shape class + 1
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
            classes[mask] = label + 1
            boxes.append(box)
            labels.append(label)
            break
    record = DetectionRecord(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                             image_id=index, name=f"shapes[{index}]")
    return record, classes
