"""``vit shards``: an image folder written as litdata shards (for ``data.dataset: streaming``)."""
from __future__ import annotations

import argparse
import sys

from ..data.shards import convert
from ._common import CommandParser, one_line


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit shards",
                                     description="Convert an image folder to litdata chunks for "
                                                 "data.dataset: streaming.")
    parser.add_argument("src", help="image folder: SRC/train/<class>/..., optional SRC/val/ and SRC/test/")
    parser.add_argument("out", help="output folder (local)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target size of a chunk file (default 64MB)")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: one per CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing (default 0)")
    parser.add_argument("--on-bad-image", default="skip", choices=["skip", "error"],
                        help="unusable files: skip (warn, list in OUT/skipped_images.tsv) or error")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad source, output folder or argument).

    Example:
        >>> main(["photos/", "photos_shards/", "--workers", "4"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    try:
        meta = convert(options.src, options.out, chunk_bytes=options.chunk_bytes, workers=options.workers,
                       seed=options.seed, on_bad_image=options.on_bad_image)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {info['count']}" for split, info in meta["splits"].items())
    print(f"wrote {options.out}: {len(meta['classes'])} classes; {counts}", file=sys.stdout)
    return 0
