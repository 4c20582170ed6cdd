"""``vit zeroshot``: classify images by class names alone, with a CLIP / SigLIP checkpoint.

    vit zeroshot IMAGES --checkpoint SRC --classes "cat,dog,bird" | --classes-file names.txt \\
        [--templates openai|simple|FILE] [--out DIR] [--topk 5] [--backend auto] [--precision auto]

Prints the top-k classes of each image and writes ``DIR/predictions.csv``. When IMAGES is a folder of class
sub-folders, the images are labelled by folder (the class names are the folders' unless ``--classes`` says
otherwise), and the accuracy, ``per_class.csv`` and ``confusion_matrix.png`` follow. The image tower runs on the
backend and precision of ``vit.deploy.runners`` (``--backend``, ``--precision``; auto by default), printed as one
line ``runner: <backend> <precision> (<why>)`` on stderr.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ._common import CommandParser, one_line
from ._inference import add_runner_arguments, runner_precision


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit zeroshot", description="Zero-shot classification from class names.")
    parser.add_argument("images", nargs="+", help="image files, folders, .txt lists, or one folder of class folders")
    parser.add_argument("--checkpoint", required=True, help="a CLIP / SigLIP model: anything vit.load_image_text reads")
    parser.add_argument("--classes", default=None, help='comma-separated class names, e.g. "cat,dog,bird"')
    parser.add_argument("--classes-file", default=None, help="a text file with one class name per line")
    parser.add_argument("--templates", default="openai",
                        help="prompt templates: openai (80, default), simple ('a photo of a {}.') or a file with one "
                             "template per line, each with {} for the class name")
    parser.add_argument("--out", default="zeroshot", help="folder for predictions.csv and the report (default zeroshot)")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    add_runner_arguments(parser)
    return parser


def _folder_classes(images: list[str]) -> list[str] | None:
    from ..data.folder import find_classes
    folder = Path(images[0])
    if len(images) == 1 and folder.is_dir() and find_classes(folder):
        return find_classes(folder)
    return None


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint, class list, template file or image or a
    backend that cannot run here, 1 for a backend whose image embeddings differ from eager PyTorch's).

    Example:
        >>> main(["photos/", "--checkpoint", "hf-hub:openai/clip-vit-base-patch32", "--classes", "cat,dog"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    for name in ("topk", "batch_size"):
        if getattr(options, name) < 1:
            print(f"error: --{name.replace('_', '-')}: expected a positive integer, got {getattr(options, name)}",
                  file=sys.stderr)
            return 2
    from ..checkpoints import CheckpointError, load_image_text
    from ..deploy.runners import BackendError, VerificationError
    from ..features.zeroshot import classify_images, read_class_names, read_templates, zeroshot_classifier
    try:
        precision = runner_precision(options)
        templates = read_templates(options.templates)
        if options.classes is None and options.classes_file is None:
            class_names = _folder_classes(options.images)
            if class_names is None:
                raise ValueError("give the class names with --classes 'a,b,c' or --classes-file FILE (IMAGES is not "
                                 "a folder of class folders to take them from)")
        else:
            class_names = read_class_names(options.classes, options.classes_file)
        model = load_image_text(options.checkpoint).eval()
        if model.tokenizer is None:
            raise ValueError(f"{options.checkpoint}: no tokenizer files come with these weights; put the tokenizer "
                             f"files (spiece.model, tokenizer.json) beside them")
        classifier = zeroshot_classifier(model, class_names, templates)
        result = classify_images(model, options.images, classifier, class_names, options.batch_size,
                                 backend=options.backend, precision=precision, calibration=options.calibration)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError, ImportError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    k = min(options.topk, len(class_names))
    values, indices = result.probabilities.topk(k, dim=1)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, probs, labels in zip(result.files, values.tolist(), indices.tolist()):
        print(f"{path}: " + ", ".join(f"{class_names[j]} {p:.3f}" for j, p in zip(labels, probs)))
        rows.append([path] + [v for j, p in zip(labels, probs) for v in (class_names[j], f"{p:.6f}")])
    header = ["file"] + [f"{kind}_{j + 1}" for j in range(k) for kind in ("label", "prob")]
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {out / 'predictions.csv'}")
    if result.folder_classes is not None and result.labelled:
        _report(result, class_names, out)
    return 0


def _report(result, class_names: list[str], out: Path) -> None:
    """Accuracy, per-class scores and the confusion matrix, with the helpers ``vit train``'s test report uses."""
    from ..training.callbacks import plot_confusion_matrix, write_per_class
    matrix = result.confusion_matrix(len(class_names))
    diagonal = matrix.diag().double()
    precision = diagonal / matrix.sum(0).clamp(min=1)
    recall = diagonal / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    write_per_class({"precision": precision, "recall": recall, "f1": f1}, matrix.sum(1), class_names,
                    out / "per_class.csv")
    plot_confusion_matrix(matrix, class_names, out / "confusion_matrix.png")
    print(f"accuracy {result.accuracy():.4f} ({int(diagonal.sum())}/{len(result.files)} images)")
    print(f"wrote {out / 'per_class.csv'}, {out / 'confusion_matrix.png'}")
