"""Similar-image search: cosine similarity against a feature index, and the neighbours drawn as a grid."""
from __future__ import annotations

import math
import textwrap
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
                    out: str | os.PathLike, columns: int = 5, query_text: str | None = None) -> Path:
    """The query image (or ``query_text``, written in the first panel), then each neighbour with its cosine
    similarity and file name, as a PNG grid."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    from ..data.images import BadImageError, load_image
    panels = [(str(query), "query")] + [(p, f"{s:.3f}") for p, s in zip(paths, scores)]
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, (ax, (path, title)) in enumerate(zip(axes, panels)):
        if index == 0 and query_text is not None:
            ax.text(0.5, 0.5, textwrap.fill(query_text, 20), ha="center", va="center", fontsize=9, wrap=True)
            ax.set_title("query", fontsize=8)
            continue
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


def embed_query(index_meta: dict, query: str, checkpoint: str | None = None, *, backend: str = "auto",
                precision: str = "auto", probe_paths: Sequence[str] = (), log=None):
    """The query's embedding (1, D), made as the index's were (its source, pool, image size, mean/std, crop), by the
    runner ``create_runner(Embedder(model, pool), backend, precision, compare="cosine")`` chose (logged as one line
    through ``log``, default stderr), checked on the query and the first of ``probe_paths`` that still decode (up
    to 16 images; the index's own images, say)."""
    from ..data import BadImageError, eval_transform, load_image
    from ..deploy.runners import PROBE_SIZE, create_runner
    from .backbone import Embedder, check_pool, load_backbone
    source = _query_source(index_meta, checkpoint)
    if not Path(query).is_file():
        raise FileNotFoundError(f"{query}: no such image file")
    pool = index_meta.get("pool", "cls")
    model = load_backbone(source, index_meta.get("img_size"), image_text=pool == "proj")
    check_same_model(index_meta, model, source)
    check_pool(model, pool)
    transform = eval_transform(model.img_size, index_meta["mean"], index_meta["std"],
                               crop_pct=index_meta.get("crop_pct") or 1.0)
    image = transform(image=load_image(query, model.in_chans))["image"][None]
    probe = [image]
    for path in probe_paths:
        if len(probe) == PROBE_SIZE:
            break
        try:
            probe.append(transform(image=load_image(path, model.in_chans))["image"][None])
        except (BadImageError, OSError, ValueError):  # moved or damaged since the index was made: not needed here
            continue
    runner = create_runner(Embedder(model, pool), backend, precision, probe=torch.cat(probe), compare="cosine",
                           log=log)
    return runner(image).float()


def _query_source(index_meta: dict, checkpoint: str | None) -> str:
    source = checkpoint or index_meta.get("source")
    if not source:
        raise ValueError("the index does not record its backbone; pass --checkpoint")
    return source


def check_same_model(index_meta: dict, model, source: str) -> None:
    """``ValueError`` naming both when the query model's weights are not those that made the index (its recorded
    ``fingerprint``): features of different models live in different spaces. A moved copy of the same weights passes."""
    from .backbone import fingerprint
    recorded = index_meta.get("fingerprint")
    if recorded is not None and fingerprint(model) != recorded:
        raise ValueError(f"the index was made by {index_meta.get('source')} (weights {recorded}), but the query model "
                         f"{source} has other weights ({fingerprint(model)}); their features are not comparable. "
                         f"Query with the model that made the index, or re-embed with this one.")


def embed_text_query(index_meta: dict, text: str, checkpoint: str | None = None):
    """A sentence's embedding (1, D) by the text tower of the image-text model that made a ``--pool proj`` index."""
    import torch

    from ..checkpoints.image_text import load_image_text
    from .backbone import at_image_size
    if index_meta.get("pool") != "proj":
        raise ValueError(f"the index holds --pool {index_meta.get('pool')} image features, outside the joint "
                         f"image-text space; text queries need an index made with vit embed --pool proj by a CLIP / "
                         f"SigLIP checkpoint")
    if not text.strip():
        raise ValueError("--text: expected a sentence, got an empty one")
    source = _query_source(index_meta, checkpoint)
    model = load_image_text(source).eval()
    check_same_model(index_meta, at_image_size(model.visual, index_meta.get("img_size")), source)
    if model.tokenizer is None:
        raise ValueError(f"{source}: no tokenizer files come with these weights; put them (spiece.model, "
                         f"tokenizer.json) beside the weights")
    with torch.inference_mode():
        return model.encode_text(model.tokenize([text])).float()
