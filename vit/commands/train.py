"""``vit train``: the training CLI (``python train.py``) under the one command."""
from __future__ import annotations


def main(args: list[str] | None = None) -> int:
    """``vit train [fit|validate|test|predict] ...`` is ``python train.py ...`` (no arguments: the default run).

    Example:
        >>> main(["fit", "--config", "configs/digits.yaml", "--trainer.max_epochs", "1"])  # doctest: +SKIP
        0
    """
    from ..training.cli import main as train_main
    train_main(args or [])
    return 0
