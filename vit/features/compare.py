"""Compare backbones on your images: kNN and linear-probe top-1 on frozen features, extraction speed, embedding
size; as a table, ``probe.csv`` and a bar chart."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import cached_features
from .extract import extract_features, samples_runner
from .features import Features
from .knn import knn_classify
from .linear import linear_probe

COLUMNS = ("backbone", "knn_top1", "linear_top1", "img_per_s", "dim")


@dataclass
class ProbeResult:
    """One backbone's row: top-1 of kNN and of the linear probe on the evaluation split, extraction images per
    second (train + val, from when they were extracted), embedding size, the probe's chosen ``C``, whether both
    splits came from the cache, and the runner that extracted them (``meta["runner"]``)."""

    backbone: str
    knn_top1: float
    linear_top1: float
    img_per_s: float | None
    dim: int
    C: float
    cached: bool
    train_images: int
    val_images: int
    runner: str | None = None  # the backend and precision that extracted the training features


def probe_backbone(source: str, train: Sequence[tuple[str, int]], val: Sequence[tuple[str, int]],
                   class_names: Sequence[str] | None = None, *, pool: str = "cls", img_size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop_pct: float | None = None, k: int = 20,
                   temperature: float = 0.07, batch_size: int = 64, num_workers: int = 0,
                   cache_dir: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = False,
                   backend: str = "auto", precision: str = "auto",
                   calibration: torch.Tensor | str | os.PathLike | None = None, log=None,
                   **trainer_options: Any) -> ProbeResult:
    """Extract (or read from the cache) the features of the ``train`` and ``val`` (path, label) samples with the
    backbone ``source`` (see ``load_backbone``), then score kNN (``knn_classify``) and a linear probe
    (``linear_probe``, tuned on the training split only) on ``val``. ``backend`` / ``precision`` / ``calibration``:
    how the backbone runs (see ``extract_features``); one runner, chosen on the first training images and logged
    once through ``log``, extracts both splits. Cached features are keyed by them too.

    Example:
        >>> probe_backbone("runs/vit/version_0/checkpoints/last.ckpt", train, val).knn_top1  # doctest: +SKIP
        0.97...
    """
    if pool == "tokens":
        raise ValueError("--pool tokens: kNN and the linear probe need one embedding per image; use cls, avg or map")
    from .backbone import load_backbone
    loaded: dict[str, Any] = {}

    def features_of(samples) -> tuple[Features, bool]:
        def extract() -> Features:
            if "model" not in loaded:  # only on a cache miss, and once for both splits
                loaded["model"] = load_backbone(source, img_size)
                loaded["runner"] = samples_runner(loaded["model"], train, pool=pool, mean=mean, std=std,
                                                  crop_pct=crop_pct, backend=backend, precision=precision,
                                                  calibration=calibration, log=log, **trainer_options)
            return extract_features(loaded["model"], list(samples), pool=pool, mean=mean, std=std,
                                    crop_pct=crop_pct, batch_size=batch_size, num_workers=num_workers,
                                    class_names=class_names, progress=progress, backend=backend,
                                    precision=precision, runner=loaded["runner"], **trainer_options,
                                    log=lambda message: None)  # samples_runner has said which runner, once
        if not use_cache:
            return extract(), False
        return cached_features(source, samples, extract, cache_dir, img_size=img_size, pool=pool,
                               crop_pct=crop_pct, mean=None if mean is None else list(mean),
                               std=None if std is None else list(std), backend=backend, precision=precision)

    (train_feats, train_hit), (val_feats, val_hit) = features_of(train), features_of(val)
    if len(train_feats) == 0 or len(val_feats) == 0:
        raise ValueError(f"{source}: no readable images in the {'training' if not len(train_feats) else 'val'} split")
    num_classes = len(class_names) if class_names else int(max(train_feats.labels.max(), val_feats.labels.max())) + 1
    predictions = knn_classify(train_feats.features, train_feats.labels, val_feats.features, k=k,
                               temperature=temperature, num_classes=num_classes)
    knn = float((predictions == val_feats.labels).float().mean())
    probe = linear_probe(train_feats.features, train_feats.labels)
    linear = float((probe.predict(val_feats.features) == val_feats.labels).float().mean())
    return ProbeResult(source, knn, linear, _speed(train_feats, val_feats), train_feats.dim, probe.C,
                       train_hit and val_hit, len(train_feats), len(val_feats), train_feats.meta.get("runner"))


def _speed(*parts: Features) -> float | None:
    """Images per second over all parts, from each part's own rate."""
    seconds, images = 0.0, 0
    for part in parts:
        rate = part.meta.get("img_per_s")
        if not rate:
            return None
        seconds += (len(part) + len(part.skipped)) / rate
        images += len(part) + len(part.skipped)
    return images / seconds if seconds else None


def format_table(results: Sequence[ProbeResult]) -> str:
    """The results as a Markdown table (what ``vit probe`` prints).

    Example:
        >>> print(format_table([ProbeResult("a.ckpt", 0.97, 0.96, 1234.5, 128, 1.0, False, 100, 50)]))
        | backbone | kNN top-1 | linear top-1 | img/s | dim |
        |---|---:|---:|---:|---:|
        | a.ckpt | 0.9700 | 0.9600 | 1234 | 128 |
    """
    lines = ["| backbone | kNN top-1 | linear top-1 | img/s | dim |", "|---|---:|---:|---:|---:|"]
    for r in results:
        speed = f"{r.img_per_s:.0f}" if r.img_per_s else "-"
        lines.append(f"| {r.backbone} | {r.knn_top1:.4f} | {r.linear_top1:.4f} | {speed} | {r.dim} |")
    return "\n".join(lines)


def write_report(results: Sequence[ProbeResult], folder: str | os.PathLike) -> tuple[Path, Path]:
    """``probe.csv`` (``backbone, knn_top1, linear_top1, img_per_s, dim``, one row per backbone in the given order)
    and ``probe.png`` (kNN and linear-probe top-1 side by side per backbone) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "probe.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in results:
            writer.writerow([r.backbone, f"{r.knn_top1:.4f}", f"{r.linear_top1:.4f}",
                             f"{r.img_per_s:.1f}" if r.img_per_s else "", r.dim])
    return table, plot_results(results, folder / "probe.png")


def plot_results(results: Sequence[ProbeResult], path: Path) -> Path:
    from matplotlib.figure import Figure

    names = [_short(r.backbone) for r in results]
    fig = Figure(figsize=(max(5.0, 1.6 * len(results) + 2), 4))
    ax = fig.subplots()
    x = torch.arange(len(results)).float()
    width = 0.38
    for offset, label, values in ((-width / 2, "kNN", [r.knn_top1 for r in results]),
                                  (width / 2, "linear probe", [r.linear_top1 for r in results])):
        bars = ax.bar((x + offset).tolist(), values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x.tolist(), labels=names, rotation=15 if len(results) > 3 else 0, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("top-1 accuracy (val)")
    ax.set_title("frozen-feature evaluation")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _short(source: str, limit: int = 36) -> str:
    """A long source cut in the middle, so both its kind (``random:``, ``hf-hub:``) and its file name show.

    Example:
        >>> _short("random:runs/vit/version_0/checkpoints/last.ckpt")
        'random:runs/vi...eckpoints/last.ckpt'
    """
    if len(source) <= limit:
        return source
    tail = (limit - 3) * 3 // 5
    return source[:limit - 3 - tail] + "..." + source[-tail:]
