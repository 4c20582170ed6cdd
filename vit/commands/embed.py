"""Embeddings of a folder, a list or a single image, written with their paths (and labels) to one file.

    vit embed IMAGES... --checkpoint SRC --out feats.safetensors [--pool cls|avg|map|tokens|proj]
                        [--img-size N] [--batch-size B] [--devices N] [--backend auto] [--precision auto]

SRC is anything ``vit.load_pretrained`` reads, a registered name (its pretrained weights) or ``random:SRC``.
A folder of class sub-folders (``root/<class>/...``) also stores labels and class names. The file layout is in
``vit.features.features``; read it back with ``vit.features.Features.load``. Runs through ``Trainer.predict``: with
``--devices N`` each process embeds its share and writes its part, and the first merges them. In one CPU process
the backbone runs on the backend and precision of ``vit.deploy.runners`` (``--backend auto --precision auto``: the
fastest here whose embeddings match eager fp32's by cosine similarity on the first images), printed as one line
``runner: <backend> <precision> (<why>)`` on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..features.features import POOLS
from ._common import CommandParser, one_line
from ._inference import add_runner_arguments, runner_precision


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit embed",
                                     description="Embeddings of images by a frozen backbone, to a .safetensors file.")
    parser.add_argument("images", nargs="+", help="image folder(s) (folder/<class>/... gives labels), image files, "
                                                  "or .txt lists of paths")
    parser.add_argument("--checkpoint", required=True, help="the backbone: any source vit.load_pretrained reads, a "
                                                            "registered name, or random:SRC")
    parser.add_argument("--out", required=True, help="output file, e.g. feats.safetensors")
    add_extraction_arguments(parser)
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="unreadable images: skip (warn, list them in OUT.skipped.tsv; default) or error")
    parser.add_argument("--devices", default="1", help="devices (processes on CPU), as Lightning's Trainer takes them")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy (auto = ddp for several devices)")
    return parser


def add_extraction_arguments(parser: argparse.ArgumentParser, pools=POOLS) -> None:
    """Options ``vit embed`` and ``vit probe`` share."""
    parser.add_argument("--pool", default="cls", choices=pools,
                        help="cls: class token (the model's own pooling without one); avg: mean of the patch tokens; "
                             "map: attention pool" + ("; tokens: every patch token (N, T, D)" if "tokens" in pools
                                                      else "")
                             + ("; proj: a CLIP / SigLIP image embedding, in the space its text tower shares (for "
                                "vit search --text)" if "proj" in pools else "") + " (default cls)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (position embeddings resampled); default: the backbone's own")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean; default: the "
                                                                           "backbone's (ImageNet if it has none)")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std; default: as --mean")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="resize to img_size / crop_pct, then center-crop; default: the backbone's (1 = no crop)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (default auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_runner_arguments(parser)  # one CPU process: the backend x precision of vit.deploy.runners


def check_extraction_arguments(options: argparse.Namespace) -> str | None:
    """The first problem with the shared options, as an error line, or None."""
    if options.img_size is not None and options.img_size < 1:
        return f"--img-size: expected a positive integer, got {options.img_size}"
    if options.batch_size < 1:
        return f"--batch-size: expected a positive integer, got {options.batch_size}"
    if options.num_workers < 0:
        return f"--num-workers: expected an integer >= 0, got {options.num_workers}"
    if options.std is not None and any(s <= 0 for s in options.std):
        return f"--std: expected positive values, got {options.std}"
    if options.crop_pct is not None and not 0 < options.crop_pct <= 1:
        return f"--crop-pct: expected a value in (0, 1], got {options.crop_pct}"
    return None


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad backbone, image or argument or a backend that cannot
    run here, 1 for a backend whose embeddings differ from eager PyTorch's).

    Example:
        >>> main(["photos/", "--checkpoint", "my_vit/", "--out", "feats.safetensors"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    problem = check_extraction_arguments(options)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    devices = int(options.devices) if options.devices.isdigit() else options.devices
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities import rank_zero_only

    from ..checkpoints import CheckpointError
    from ..deploy.runners import BackendError, VerificationError
    from ..features import extract_features
    try:
        result = extract_features(options.checkpoint, options.images, pool=options.pool, img_size=options.img_size,
                                  mean=options.mean, std=options.std, crop_pct=options.crop_pct,
                                  batch_size=options.batch_size,
                                  num_workers=options.num_workers, on_bad_image=options.on_bad_image, out=options.out,
                                  progress=options.progress, backend=options.backend,
                                  precision=runner_precision(options), calibration=options.calibration,
                                  accelerator=options.accelerator, devices=devices, strategy=options.strategy)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except MisconfigurationException as error:  # Lightning's word on --accelerator / --devices / --strategy
        print(f"error: --accelerator {options.accelerator} --devices {options.devices}: {one_line(error)}",
              file=sys.stderr)
        return 2
    if rank_zero_only.rank != 0:
        return 0
    out = Path(options.out)
    skipped = ""
    if result.skipped:
        listing = out.with_name(f"{out.stem}.skipped.tsv")
        listing.write_text("".join(f"{path}\t{reason}\n" for path, reason in result.skipped), encoding="utf-8")
        skipped = f"; skipped {len(result.skipped)} unreadable image(s), listed in {listing}"
    labels = f", {len(result.class_names)} classes" if result.class_names else ""
    print(f"wrote {len(result)} embeddings of shape {tuple(result.features.shape[1:])} ({result.meta['pool']}{labels}) "
          f"to {out}{skipped}")
    return 0
