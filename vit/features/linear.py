"""Linear probe: logistic regression (scikit-learn) on frozen, standardised features, its regularisation chosen
on a held-out part of the training split only (the evaluation split is never looked at)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass
class LinearProbe:
    """A fitted probe: ``classifier`` (StandardScaler + LogisticRegression, refit on the whole training split with
    the chosen ``C``) and ``sweep`` ({C: top-1 on the held-out part of the training split})."""

    classifier: object
    C: float
    sweep: dict[float, float] = field(default_factory=dict)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,) for features (N, D)."""
        return torch.as_tensor(self.classifier.predict(_numpy(features)), dtype=torch.long)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, Cs: Sequence[float] = C_GRID,
                 holdout: float = 0.2, seed: int = 0, max_iter: int = 1000) -> LinearProbe:
    """Fit logistic regression on standardised ``train_features`` (N, D): each ``C`` in ``Cs`` is fitted on
    1 - ``holdout`` of the training split and scored on the rest (stratified, seeded); the best (the smaller on a
    tie) is refit on the whole training split. A split too small to hold out a part gets ``C=1`` without a sweep.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(20, 4, generator=g) + 3, torch.randn(20, 4, generator=g) - 3])
        >>> y = torch.tensor([0] * 20 + [1] * 20)
        >>> probe = linear_probe(x, y)
        >>> probe.predict(torch.tensor([[3.0] * 4, [-3.0] * 4])).tolist(), probe.C in C_GRID
        ([0, 1], True)
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x, y = _numpy(train_features), np.asarray(train_labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected (N, D) features and N labels, got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("linear_probe: the training split needs at least two classes")

    def fit(c: float, xs: np.ndarray, ys: np.ndarray):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        # One thread: L-BFGS multiplies thin matrices (N x D by D x classes), which threads barely speed up, while
        # BLAS threads spinning beside torch's OpenMP pool made each fit 10-100x slower on a busy CPU.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # a weak C that has not converged just scores lower
            return model.fit(xs, ys)

    Cs = sorted(float(c) for c in Cs)
    sweep: dict[float, float] = {}
    classes = len(np.unique(y))
    held = max(int(round(holdout * len(y))), classes)  # stratified: at least one per class
    if len(Cs) > 1 and len(y) - held >= classes:
        counts = np.bincount(y)
        stratify = y if counts[counts > 0].min() >= 2 else None
        fit_x, held_x, fit_y, held_y = train_test_split(x, y, test_size=held, random_state=seed, stratify=stratify)
        if len(np.unique(fit_y)) >= 2:
            sweep = {c: float((fit(c, fit_x, fit_y).predict(held_x) == held_y).mean()) for c in Cs}
    best = max(sweep, key=lambda c: (sweep[c], -c)) if sweep else (1.0 if 1.0 in Cs else Cs[len(Cs) // 2])
    return LinearProbe(fit(best, x, y), best, sweep)


def _numpy(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().float().cpu().numpy()
    return np.asarray(features, dtype=np.float32)
