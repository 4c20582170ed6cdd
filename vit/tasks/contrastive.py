"""Contrastive image-text losses, CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023), over the batch of every
process: pure functions of features, testable without a Trainer.

Under DDP each process holds N of the W * N pairs. Its image and text features are gathered from every process
*with autograd* (``torch.distributed.nn.all_gather``, whose backward sums each gathered slice's gradient back to the
process that made it), and each process scores its own N rows against all W * N columns (open_clip's
``gather_with_grad=True, local_loss=True``). Each process's loss is normalised per local row, so the mean over
processes, which DDP's gradient averaging takes, is exactly the loss of the global batch in one process: the same
value and the same gradients.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("clip", "siglip")


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(every process's image features, every process's text features, offset of this process's rows in them);
    outside DDP the inputs themselves and offset 0. Gradients flow back to the process each slice came from."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features, 0
    from torch.distributed.nn.functional import all_gather
    sizes = [torch.zeros(1, dtype=torch.long, device=image_features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(image_features)], device=image_features.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"contrastive loss under DDP: the processes hold batches of {[int(s) for s in sizes]} pairs; "
                         f"every process needs the same batch size (set data.drop_last: true)")
    rank = dist.get_rank()
    all_images = torch.cat(all_gather(image_features), dim=0)
    all_texts = torch.cat(all_gather(text_features), dim=0)
    return all_images, all_texts, rank * len(image_features)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              all_images: torch.Tensor | None = None, all_texts: torch.Tensor | None = None,
              offset: int = 0) -> torch.Tensor:
    """Symmetric cross-entropy: each of the N local images picks its text among all texts, each local text its
    image among all images; ``logit_scale`` is the temperature (``exp`` of the model's log-parameter).

    Example:
        >>> f = F.normalize(torch.eye(3), dim=-1)
        >>> round(clip_loss(f, f, torch.tensor(1.0)).item(), 4)  # -log(e / (e + 2)) both ways
        0.5514
    """
    all_images = image_features if all_images is None else all_images
    all_texts = text_features if all_texts is None else all_texts
    labels = torch.arange(len(image_features), device=image_features.device) + offset
    logits_per_image = logit_scale * image_features @ all_texts.T  # (N, W * N)
    logits_per_text = logit_scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | float, all_texts: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
    """Sigmoid loss: every (image, text) pair is a binary decision, +1 for the matching pair, -1 for all others;
    ``-sum(log sigmoid(label * (scale * cos + bias)))`` over the local images' rows, divided by their number.

    Example:
        >>> f = F.normalize(torch.eye(2), dim=-1)
        >>> round(siglip_loss(f, f, torch.tensor(1.0), 0.0).item(), 4)  # (2 softplus(-1) + 2 log 2) / 2 images
        1.0064
    """
    all_texts = text_features if all_texts is None else all_texts
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # (N, W * N)
    rows = torch.arange(len(image_features), device=logits.device)
    labels = -torch.ones_like(logits)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / len(image_features)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: Literal["clip", "siglip"] = "clip"
                     ) -> torch.Tensor:
    """The ``kind`` loss of this process's normalised features against those of every process (see the module's
    note): its mean over processes is the loss of the whole global batch.

    Example:
        >>> f = F.normalize(torch.randn(4, 8), dim=-1)
        >>> bool(contrastive_loss(f, f, torch.tensor(10.0), kind="clip") < 0.1)
        True
    """
    if kind not in LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {kind!r}")
    all_images, all_texts, offset = gather_features(image_features, text_features)
    if kind == "clip":
        return clip_loss(image_features, text_features, logit_scale, all_images, all_texts, offset)
    if logit_bias is None:
        raise ValueError("loss: siglip needs a model with a logit_bias (build it with init_logit_bias)")
    return siglip_loss(image_features, text_features, logit_scale, logit_bias, all_texts, offset)
