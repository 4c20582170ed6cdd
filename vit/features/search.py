"""Similar-image search: cosine similarity against a feature index, and the neighbours drawn as a grid."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


def nearest(index: torch.Tensor, queries: torch.Tensor, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, rows), each (Q, min(k, N)): the ``k`` rows of ``index`` (N, D) most similar to each query (Q, D) by
    cosine similarity, most similar first.

    Example:
        >>> scores, rows = nearest(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), torch.tensor([[1.0, 0.1]]), k=2)
        >>> rows.tolist(), [round(s, 3) for s in scores[0].tolist()]
        ([[0, 2]], [0.995, 0.774])
    """
    if index.ndim != 2 or queries.ndim != 2 or index.shape[1] != queries.shape[1]:
        raise ValueError(f"expected (N, D) index and (Q, D) query features, got {tuple(index.shape)} and "
                         f"{tuple(queries.shape)}")
    if k < 1:
        raise ValueError(f"--k: expected a positive integer, got {k}")
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(index.float(), dim=1).T
    return similarity.topk(min(k, len(index)), dim=1)


def plot_neighbours(query: str | os.PathLike, paths: Sequence[str], scores: Sequence[float],
                    out: str | os.PathLike, columns: int = 5) -> Path:
    """The query image, then each neighbour with its cosine similarity and file name, as a PNG grid."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    from ..data.images import BadImageError, load_image
    panels = [(str(query), "query")] + [(p, f"{s:.3f}") for p, s in zip(paths, scores)]
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (path, title) in zip(axes, panels):
        try:
            ax.imshow(load_image(path, 3), interpolation="nearest")
        except BadImageError:  # moved or deleted since the index was made: keep its place, say so
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        name = Path(path).name
        ax.set_title(f"{title}\n{name if len(name) <= 24 else name[:21] + '...'}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def embed_query(index_meta: dict, query: str, checkpoint: str | None = None):
    """The query's embedding (1, D), made as the index's were (its source, pool, image size, mean/std, crop)."""
    import torch

    from ..data import eval_transform, load_image
    from .backbone import check_pool, load_backbone, pool_tokens
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
