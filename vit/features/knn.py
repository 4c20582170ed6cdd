"""k-nearest-neighbour classification on frozen features, the DINO protocol (Caron et al. 2021): cosine
similarity, the k most similar training images vote for their class with weight exp(similarity / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels (N,) for ``features`` (N, D) from the ``k`` nearest of ``train_features`` (M, D) by cosine
    similarity, each voting exp(similarity / ``temperature``) for its label (DINO: k=20, T=0.07).

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn_classify(train, torch.tensor([0, 0, 1, 1]), torch.tensor([[0.8, 0.3], [0.2, 0.7]]), k=3).tolist()
        [0, 1]
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be positive and temperature > 0, got k={k}, temperature={temperature}")
    if train_features.ndim != 2 or features.ndim != 2 or train_features.shape[1] != features.shape[1]:
        raise ValueError(f"expected (M, D) training and (N, D) query features, got {tuple(train_features.shape)} "
                         f"and {tuple(features.shape)}")
    train_labels = train_labels.long().to(train_features.device)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)
    predictions = []
    for chunk in features.split(batch_size):
        similarity = F.normalize(chunk.float().to(train.device), dim=1) @ train.T  # (n, M)
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions).cpu() if predictions else torch.zeros(0, dtype=torch.long)
