"""Similar images: the nearest entries of a feature index (from ``vit embed``) to a query image.

    vit search QUERY --index feats.safetensors [--k 8] [--out neighbours.png]
    vit search --text "a red car at night" --index feats.safetensors [--k 8] [--out neighbours.png]

The query is embedded the way the index was (the backbone, pool, image size and normalisation recorded in the
index file; ``--checkpoint`` if the backbone has moved), ranked by cosine similarity, printed and drawn as a grid.
A ``--text`` query needs an index in the joint image-text space (``vit embed --pool proj`` with a CLIP / SigLIP
checkpoint) and is embedded by that model's text tower. A query model whose weights are not the index's is refused.
An image query runs on the backend and precision of ``vit.deploy.runners`` (``--backend``, ``--precision``; auto by
default), checked on the query and the index's first images, and printed as one line ``runner: ...`` on stderr.
"""
from __future__ import annotations

import argparse
import sys

from ._common import CommandParser, one_line
from ._inference import add_runner_arguments, runner_precision


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit search", description="Nearest images by cosine similarity.")
    parser.add_argument("query", nargs="?", default=None, help="the query image (or use --text)")
    parser.add_argument("--text", default=None, help="a sentence to search by (an index made with --pool proj)")
    parser.add_argument("--index", required=True, help="a feature file written by vit embed")
    parser.add_argument("--k", type=int, default=8, help="how many neighbours (default 8)")
    parser.add_argument("--out", default="neighbours.png", help="the grid of neighbours (default neighbours.png)")
    parser.add_argument("--checkpoint", default=None,
                        help="the backbone, when it is no longer where the index says it was")
    add_runner_arguments(parser, calibration=False)  # image queries; int8 calibrates on the probe images
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad index, query, backbone or argument or a backend that
    cannot run here, 1 for a backend whose embeddings differ from eager PyTorch's).

    Example:
        >>> main(["cat.jpg", "--index", "feats.safetensors", "--k", "8"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if (options.query is None) == (options.text is None):
        print("error: give a query image or --text 'a sentence' (one of them)", file=sys.stderr)
        return 2
    if options.k < 1:
        print(f"error: --k: expected a positive integer, got {options.k}", file=sys.stderr)
        return 2
    from ..checkpoints import CheckpointError
    from ..deploy.runners import BackendError, VerificationError
    from ..features import Features, nearest
    from ..features.search import embed_query, embed_text_query, plot_neighbours
    try:
        precision = runner_precision(options)
        index = Features.load(options.index)
        if index.features.ndim != 2:
            raise ValueError(f"{options.index}: holds per-token features (pool 'tokens'); search needs one embedding "
                             f"per image (embed with --pool cls, avg or map)")
        if len(index) == 0:
            raise ValueError(f"{options.index}: the index is empty")
        if options.text is not None:
            query = embed_text_query(index.meta, options.text, options.checkpoint)
        else:
            query = embed_query(index.meta, options.query, options.checkpoint, backend=options.backend,
                                precision=precision, probe_paths=index.paths[:32])
        if query.shape[1] != index.dim:
            raise ValueError(f"{options.index}: embedding size {index.dim}, but the backbone gives {query.shape[1]}; "
                             f"pass the --checkpoint that made the index")
        scores, rows = nearest(index.features, query, options.k)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError, ImportError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    paths = [index.paths[i] for i in rows[0].tolist()]
    for rank, (path, score) in enumerate(zip(paths, scores[0].tolist()), 1):
        print(f"{rank}\t{score:.4f}\t{path}")
    out = plot_neighbours(options.query or "", paths, scores[0].tolist(), options.out, query_text=options.text)
    print(f"wrote {out}")
    return 0
