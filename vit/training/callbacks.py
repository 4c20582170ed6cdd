"""Callbacks that write results people look at: predictions CSV, confusion matrix PNG, per-class table.

``ImageClassifier.configure_callbacks`` adds both unless the trainer already has one of the same type (so
``trainer.callbacks`` in a recipe can configure them, e.g. ``PredictionWriter(topk=3)``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory (``runs/<name>/version_N`` with the CLI's loggers, else ``default_root_dir``)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def class_labels(module: L.LightningModule, num_classes: int) -> list[str]:
    names = getattr(module, "class_names", None)
    return list(names) if names else [str(i) for i in range(num_classes)]


class PredictionWriter(BasePredictionWriter):
    """``trainer.predict`` -> ``predictions.csv`` in the run directory: file, then top-k labels and probabilities.

    Expects batches ``(images, index)`` where ``index`` points into ``datamodule.predict_files`` (what
    ``ImageDataModule`` gives for ``data.predict_path``); without that list the index is written instead.

    Example:
        >>> writer = PredictionWriter(topk=3, filename="out.csv")  # trainer.callbacks or a recipe
    """

    def __init__(self, topk: int = 5, filename: str = "predictions.csv"):
        super().__init__(write_interval="batch")
        self.topk = topk
        self.filename = filename
        self.rows: list[list[Any]] = []
        self.path: Path | None = None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        probs = prediction.float()
        index = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        files = getattr(trainer.datamodule, "predict_files", None) if trainer.datamodule is not None else None
        names = class_labels(pl_module, probs.shape[-1])
        values, labels = probs.topk(min(self.topk, probs.shape[-1]), dim=-1)
        for row in range(len(probs)):
            i = int(index[row]) if index is not None else len(self.rows)
            entry: list[Any] = [files[i] if files else i]
            for value, label in zip(values[row].tolist(), labels[row].tolist()):
                entry += [names[label], f"{value:.6f}"]
            self.rows.append(entry)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        k = (len(self.rows[0]) - 1) // 2 if self.rows else self.topk
        header = ["file"] + [f"{kind}_{j + 1}" for j in range(k) for kind in ("label", "prob")]
        name = self.filename if trainer.world_size == 1 else f"{Path(self.filename).stem}_rank{trainer.global_rank}.csv"
        self.path = run_dir(trainer) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *self.rows])
        print(f"wrote {len(self.rows)} predictions to {self.path}", flush=True)


class TestReport(Callback):
    """After ``trainer.test``: ``confusion_matrix.png`` and ``per_class.csv`` (precision, recall, F1, support)
    in the run directory, from the module's ``test_confmat`` and ``test_per_class`` torchmetrics (synced over
    ranks)."""

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        confmat, per_class = getattr(pl_module, "test_confmat", None), getattr(pl_module, "test_per_class", None)
        if confmat is None or per_class is None or not confmat.update_called:
            return
        matrix, scores = confmat.compute().cpu(), {k: v.cpu() for k, v in per_class.compute().items()}
        confmat.reset()
        per_class.reset()
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        names = class_labels(pl_module, matrix.shape[0])
        write_per_class(scores, matrix.sum(dim=1), names, folder / "per_class.csv")
        plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png")


def write_per_class(scores: dict[str, torch.Tensor], support: torch.Tensor, names: Sequence[str], path: Path) -> Path:
    """``class, precision, recall, f1, support`` rows: ``scores`` holds one tensor per metric, a value per class.

    Example:
        >>> import tempfile
        >>> scores = {"precision": torch.tensor([1.0, 0.5]), "recall": torch.tensor([0.75, 1.0]),
        ...           "f1": torch.tensor([0.8571, 0.6667])}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     print(write_per_class(scores, torch.tensor([4, 2]), ["cat", "dog"], Path(tmp) / "pc.csv").read_text())
        class,precision,recall,f1,support
        cat,1.0000,0.7500,0.8571,4
        dog,0.5000,1.0000,0.6667,2
        <BLANKLINE>
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{float(scores[k][i]):.4f}" for k in ("precision", "recall", "f1")),
                             int(support[i])])
    return path


def plot_confusion_matrix(matrix: torch.Tensor, names: Sequence[str], path: Path) -> Path:
    """Confusion matrix as a PNG: row-normalised colours, counts written in the cells (up to 30 classes)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in workers and on servers

    n = len(names)
    counts = matrix.long()
    rates = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.4 * n, 30)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), labels=names, rotation=90)
        ax.set_yticks(range(n), labels=names)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                            color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(counts.sum())} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
