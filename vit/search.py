"""Similar images: the nearest entries of a feature index (from ``python -m vit.embed``) to a query image.

    python -m vit.search QUERY --index feats.safetensors [--k 8] [--out neighbours.png]

The query is embedded the way the index was (the backbone, pool, image size and normalisation recorded in the
index file; ``--checkpoint`` if the backbone has moved), ranked by cosine similarity, printed and drawn as a grid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .embed import one_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vit.search", description="Nearest images by cosine similarity.")
    parser.add_argument("query", help="the query image")
    parser.add_argument("--index", required=True, help="a feature file written by python -m vit.embed")
    parser.add_argument("--k", type=int, default=8, help="how many neighbours (default 8)")
    parser.add_argument("--out", default="neighbours.png", help="the grid of neighbours (default neighbours.png)")
    parser.add_argument("--checkpoint", default=None,
                        help="the backbone, when it is no longer where the index says it was")
    return parser


def embed_query(index_meta: dict, query: str, checkpoint: str | None = None):
    """The query's embedding (1, D), made as the index's were (its source, pool, image size, mean/std, crop)."""
    import torch

    from .data import eval_transform, load_image
    from .tasks.backbone import check_pool, load_backbone, pool_tokens
    source = checkpoint or index_meta.get("source")
    if not source:
        raise ValueError("the index does not record its backbone; pass --checkpoint")
    if not Path(query).is_file():
        raise FileNotFoundError(f"{query}: no such image file")
    model = load_backbone(source, index_meta.get("img_size"))
    pool = index_meta.get("pool", "cls")
    check_pool(model, pool)
    transform = eval_transform(model.img_size, index_meta["mean"], index_meta["std"],
                               crop_pct=index_meta.get("crop_pct") or 1.0)
    image = transform(image=load_image(query, model.in_chans))["image"][None]
    with torch.inference_mode():
        return pool_tokens(model, model.forward_features(image), pool).float()


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad index, query, backbone or argument).

    Example:
        >>> main(["cat.jpg", "--index", "feats.safetensors", "--k", "8"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if options.k < 1:
        print(f"error: --k: expected a positive integer, got {options.k}", file=sys.stderr)
        return 2
    from .checkpoints import CheckpointError
    from .tasks import Features, nearest
    from .tasks.search import plot_neighbours
    try:
        index = Features.load(options.index)
        if index.features.ndim != 2:
            raise ValueError(f"{options.index}: holds per-token features (pool 'tokens'); search needs one embedding "
                             f"per image (embed with --pool cls, avg or map)")
        if len(index) == 0:
            raise ValueError(f"{options.index}: the index is empty")
        query = embed_query(index.meta, options.query, options.checkpoint)
        if query.shape[1] != index.dim:
            raise ValueError(f"{options.index}: embedding size {index.dim}, but the backbone gives {query.shape[1]}; "
                             f"pass the --checkpoint that made the index")
        scores, rows = nearest(index.features, query, options.k)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    paths = [index.paths[i] for i in rows[0].tolist()]
    for rank, (path, score) in enumerate(zip(paths, scores[0].tolist()), 1):
        print(f"{rank}\t{score:.4f}\t{path}")
    out = plot_neighbours(options.query, paths, scores[0].tolist(), options.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
