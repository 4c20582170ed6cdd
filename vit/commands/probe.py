"""Pick a backbone for your images: kNN and linear-probe top-1 on frozen features, speed and embedding size.

    vit probe --data.root ROOT --backbone SRC [--backbone SRC2 ...] [--out probe/]

ROOT is an image folder as for training (``root/train/<class>/...`` and ``root/val/...``, or ``root/<class>/...``
split by ``--data.val_fraction`` and ``--data.seed``). Each SRC is anything ``vit.load_pretrained`` reads, a
registered name (its pretrained weights) or ``random:SRC`` (SRC's shape with random weights, a baseline).
Features are cached (see ``vit.features.cache``), so adding a backbone to the list only extracts the new one.
Prints a table and writes ``probe.csv`` and ``probe.png`` to ``--out``. Each backbone runs on the backend and
precision of ``vit.deploy.runners`` (``--backend``, ``--precision``; auto by default), one line
``runner: <backend> <precision> (<why>)`` per backbone extracted.
"""
from __future__ import annotations

import argparse
import sys

from ._common import CommandParser, one_line
from ._inference import runner_precision
from .embed import add_extraction_arguments, check_extraction_arguments


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit probe",
                                     description="Compare frozen backbones on an image folder: kNN and linear-probe "
                                                 "top-1, img/s, embedding size.")
    parser.add_argument("--data.root", dest="root", required=True, help="image folder: root/train/<class>/... and "
                                                                         "root/val/..., or root/<class>/...")
    parser.add_argument("--data.val_fraction", dest="val_fraction", type=float, default=0.1,
                        help="share held out for evaluation when there is no val/ folder (default 0.1)")
    parser.add_argument("--data.seed", dest="seed", type=int, default=42, help="seed of that split (default 42)")
    parser.add_argument("--data.on_bad_image", dest="on_bad_image", choices=("skip", "error"), default="skip",
                        help="unreadable images: skip (warn; default) or error")
    parser.add_argument("--backbone", action="append", required=True,
                        help="a backbone to evaluate (repeat for several): a file, a directory, hf-hub:..., timm:..., "
                             "a registered name, or random:SRC")
    parser.add_argument("--out", default="probe", help="folder for probe.csv and probe.png (default probe/)")
    add_extraction_arguments(parser, pools=("cls", "avg", "map"))
    parser.add_argument("--k", type=int, default=20, help="neighbours for kNN (default 20, as DINO)")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache (default $VIT_CACHE_DIR/features, else ~/.cache/vit/features)")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false", help="always extract anew")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad folder, backbone or argument or a backend that cannot
    run here, 1 for a backend whose embeddings differ from eager PyTorch's).

    Example:
        >>> main(["--data.root", "digits/", "--backbone", "a.ckpt", "--backbone", "random:a.ckpt"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    problem = check_extraction_arguments(options)
    if options.k < 1:
        problem = f"--k: expected a positive integer, got {options.k}"
    elif options.temperature <= 0:
        problem = f"--temperature: expected a positive number, got {options.temperature}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ..checkpoints import CheckpointError
    from ..data import ImageDataModule
    from ..deploy.runners import BackendError, VerificationError
    from ..features.compare import format_table, probe_backbone, write_report
    results = []
    try:
        precision = runner_precision(options)
        data = ImageDataModule("imagefolder", root=options.root, val_fraction=options.val_fraction,
                               seed=options.seed, on_bad_image=options.on_bad_image)
        data.setup("fit")
        train, val = data.train_set.samples, data.val_set.samples
        print(f"{options.root}: {len(train)} training and {len(val)} evaluation images, {data.num_classes} classes",
              file=sys.stderr)
        for source in options.backbone:
            result = probe_backbone(source, train, val, data.class_names, pool=options.pool, img_size=options.img_size,
                                    mean=options.mean, std=options.std, crop_pct=options.crop_pct, k=options.k,
                                    temperature=options.temperature,
                                    batch_size=options.batch_size, num_workers=options.num_workers,
                                    cache_dir=options.cache_dir, use_cache=options.use_cache,
                                    progress=options.progress, backend=options.backend, precision=precision,
                                    calibration=options.calibration, accelerator=options.accelerator)
            print(f"{source}: kNN {result.knn_top1:.4f}, linear {result.linear_top1:.4f} (C={result.C:g})"
                  + (f" (features from the cache, made by {result.runner or 'eager fp32'})" if result.cached else ""),
                  file=sys.stderr)
            results.append(result)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except MisconfigurationException as error:  # Lightning's word on --accelerator
        print(f"error: --accelerator {options.accelerator}: {one_line(error)}", file=sys.stderr)
        return 2
    print(format_table(results))
    table, chart = write_report(results, options.out)
    print(f"wrote {table} and {chart}")
    return 0
