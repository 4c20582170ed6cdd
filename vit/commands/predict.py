"""``vit predict``: top-k classes for a few images, or boxes for images and folders with a detection checkpoint
(``predictions.json`` in COCO results style and the images with their boxes drawn), or with a segmentation
checkpoint an index mask and an overlay per image."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ..checkpoints import CheckpointError
from ..deploy.detect import coco_image_ids, image_files, is_detection_checkpoint, load_detector, predict_boxes
from ..deploy.predict import calibration_images, load_model, predict
from ..deploy.runners import BackendError, VerificationError
from ..deploy.segment import is_segmentation_checkpoint, load_segmenter, predict_masks
from ._common import CommandParser, one_line
from ._inference import add_runner_arguments, runner_precision


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit predict", description="Top-k classes for a few images; with a detection "
                                                            "checkpoint, boxes (COCO results JSON + drawn images).")
    parser.add_argument("images", nargs="+", help="image files (detection: files or folders)")
    parser.add_argument("--checkpoint", required=True,
                        help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print per image (default 5)")
    add_runner_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: 0 for a single batch, else 1)")
    parser.add_argument("--compile", action="store_true", help="the same as --backend compile")
    parser.add_argument("--out", default="predictions",
                        help="detection: the folder for predictions.json and the drawn images; segmentation: for "
                             "<stem>.png index masks and <stem>_overlay.png (default predictions)")
    parser.add_argument("--score-threshold", type=float, default=0.05,
                        help="detection: the lowest score kept (default 0.05; lower gives mAP tools the full list)")
    parser.add_argument("--annotations", default=None,
                        help="detection: the COCO annotation file the images come from, to add their image_id")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint, image, argument or a backend that cannot
    run here, 1 for a backend whose answers differ from eager PyTorch's).

    Example:
        >>> main(["cat.jpg", "--checkpoint", "my_vit/", "--topk", "3"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if is_detection_checkpoint(options.checkpoint):
        return _predict_boxes(options)
    if is_segmentation_checkpoint(options.checkpoint):
        return _predict_masks(options)
    for name in ("topk", "batch_size"):
        if getattr(options, name) < 1:
            print(f"error: --{name.replace('_', '-')}: expected a positive integer, got {getattr(options, name)}",
                  file=sys.stderr)
            return 2
    if options.workers is not None and options.workers < 0:
        print(f"error: --workers: expected 0 or more, got {options.workers}", file=sys.stderr)
        return 2
    backend = "compile" if options.compile else options.backend
    try:
        precision = runner_precision(options)
        model = load_model(options.checkpoint)
        calibration = calibration_images(model, options.calibration) if options.calibration else None
        results = predict(model, options.images, options.topk, options.batch_size, backend=backend,
                          precision=precision, workers=options.workers, calibration=calibration)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for path, top in zip(options.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    return 0


def _predict_boxes(options: argparse.Namespace) -> int:
    if not 0 <= options.score_threshold <= 1:
        print(f"error: --score-threshold: expected a value in [0, 1], got {options.score_threshold}", file=sys.stderr)
        return 2
    try:
        files = image_files(options.images)
        image_ids = coco_image_ids(options.annotations) if options.annotations else None
        model = load_detector(options.checkpoint)
        results, written = predict_boxes(model, files, options.out, options.score_threshold, image_ids)
    except (CheckpointError, ValueError, OSError, KeyError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for path, entries in zip(files, results):
        found = ", ".join(f"{e['category_name']} {e['score']:.2f}" for e in entries[:5])
        print(f"{path}: {len(entries)} boxes" + (f" ({found}{', ...' if len(entries) > 5 else ''})" if found else ""))
    print(f"wrote {written}")
    return 0


def _predict_masks(options: argparse.Namespace) -> int:
    try:
        files = image_files(options.images)
        model = load_segmenter(options.checkpoint)
        masks = predict_masks(model, files, options.out)
    except (CheckpointError, ValueError, OSError, KeyError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    names = model.class_names or [str(k) for k in range(int(model.hparams.num_classes))]
    for path, mask in zip(files, masks):
        counts = np.bincount(mask.ravel(), minlength=len(names))
        top = ", ".join(f"{names[k]} {counts[k] / mask.size:.0%}" for k in counts.argsort()[::-1][:3] if counts[k])
        print(f"{path}: {top}")
    print(f"wrote {len(masks)} masks and overlays to {options.out}")
    return 0
