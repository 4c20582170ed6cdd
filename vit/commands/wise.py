"""``vit wise``: WiSE-FT (Wortsman et al. 2022), the weight-space ensemble of a zero-shot classifier and the
classifier fine-tuned from it (``model.head_init: zeroshot``).

    vit wise --zeroshot SRC --finetuned CKPT --alpha 0.5 --out DIR
    vit wise --zeroshot SRC --finetuned CKPT --sweep --images VAL_FOLDER --out DIR

SRC is the CLIP / SigLIP model the fine-tune started from; its zero-shot head is rebuilt from the class prompts and
templates CKPT records (``--classes`` / ``--templates`` override them). DIR receives the ensemble at ``--alpha`` as a
``save_pretrained`` folder (``vit predict`` reads it); ``--sweep`` also prints the accuracy on VAL_FOLDER
(class sub-folders) for alpha 0, 0.1, ..., 1 and writes ``wise_sweep.csv`` and ``wise_sweep.png``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ._common import CommandParser, one_line


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit wise", description="WiSE-FT: interpolate zero-shot and fine-tuned weights.")
    parser.add_argument("--zeroshot", required=True, help="the CLIP / SigLIP model the fine-tune started from")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned classifier (.ckpt or save_pretrained folder)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, 0..1 (default 0.5)")
    parser.add_argument("--out", default="wise", help="folder for the ensemble (and the sweep); default wise")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class prompts (default: the checkpoint's class_prompts or class names)")
    parser.add_argument("--templates", default=None,
                        help="openai, simple or a file (default: the checkpoint's templates, else openai)")
    parser.add_argument("--sweep", action="store_true", help="accuracy for alpha 0, 0.1, ..., 1 on --images")
    parser.add_argument("--images", default=None, help="--sweep: a validation folder of class sub-folders")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad argument, checkpoint or folder).

    Example:
        >>> main(["--zeroshot", "clip/", "--finetuned", "ft.ckpt", "--alpha", "0.5", "--out", "wise"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if options.sweep and not options.images:
        print("error: --sweep needs --images: a validation folder of class sub-folders", file=sys.stderr)
        return 2
    from ..checkpoints import CheckpointError, load_image_text, load_pretrained, save_pretrained
    from ..features.wise import (finetune_prompts, folder_accuracy, plot_sweep, wise_ft,
                                 zeroshot_head_model)
    try:
        if not 0.0 <= options.alpha <= 1.0:
            raise ValueError(f"--alpha: expected a value in [0, 1], got {options.alpha}")
        finetuned = load_pretrained(options.finetuned)
        class_names = finetuned.pretrained_cfg.get("class_names")
        prompts, templates = finetune_prompts(options.finetuned)
        prompts = [c.strip() for c in options.classes.split(",")] if options.classes else prompts or class_names
        templates = options.templates or templates or "openai"
        if not prompts or len(prompts) != finetuned.num_classes:
            raise ValueError(f"--classes: {options.finetuned} has {finetuned.num_classes} classes; give one prompt "
                             f"per class (got {prompts})")
        zeroshot = zeroshot_head_model(load_image_text(options.zeroshot), prompts, templates)
        model = wise_ft(zeroshot, finetuned, options.alpha)
        names = class_names or prompts
        out = Path(options.out)
        cfg = finetuned.pretrained_cfg
        save_pretrained(model, out, class_names=names, mean=cfg.get("mean"), std=cfg.get("std"))
        print(f"wrote {out} (alpha {options.alpha})")
        if options.sweep:
            alphas = [round(0.1 * i, 1) for i in range(11)]
            accuracies = []
            for alpha in alphas:
                mixed = wise_ft(zeroshot, finetuned, alpha)
                mixed.pretrained_cfg = cfg
                accuracies.append(folder_accuracy(mixed, options.images, names))
                print(f"alpha {alpha:.1f}: accuracy {accuracies[-1]:.4f}")
            with open(out / "wise_sweep.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([["alpha", "accuracy"], *zip(alphas, accuracies)])
            print(f"wrote {out / 'wise_sweep.csv'}, {plot_sweep(alphas, accuracies, out / 'wise_sweep.png')}")
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0
