"""Fine-tuning from a zero-shot head, and WiSE-FT (Wortsman et al. 2022): the weight-space ensemble of the
zero-shot and the fine-tuned classifier, ``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned``.

The zero-shot classifier is an ordinary ``VisionTransformer``: the image tower of a CLIP / SigLIP model whose image
projection P (the tower's head) is folded into a C-way head initialised from the text embeddings W (D, C), scaled by
``logit_scale``: ``head.weight = scale * W.T @ P.weight``, ``head.bias = scale * W.T @ P.bias`` (+ SigLIP's bias).
Its logits are the zero-shot logits times the length of the image's projected feature, a positive factor per
image, so it ranks the classes exactly as zero-shot classification does (same predictions, same accuracy), and it
stays a plain classifier: ``vit predict``, export and WiSE-FT take it as any other.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..models.image_text import ImageTextModel
from ..models.vision import VisionTransformer
from .zeroshot import Template, zeroshot_classifier


@torch.no_grad()
def zeroshot_head_model(model: ImageTextModel, class_names: Sequence[str],
                        templates: str | Sequence[Template] = "openai") -> VisionTransformer:
    """The image tower of ``model`` as a classifier of ``class_names`` whose head is the zero-shot one (see the
    module's note); ``pretrained_cfg`` (mean/std, image size) is kept and records the class names.

    Example:
        >>> classifier = zeroshot_head_model(load_image_text("hf-hub:openai/clip-vit-base-patch32"),
        ...                                  ["cat", "dog"], "simple")  # doctest: +SKIP
        >>> classifier.num_classes  # doctest: +SKIP
        2
    """
    weights = zeroshot_classifier(model, class_names, templates)  # (D, C)
    columns = (model.logit_scale.exp() * weights).T.float()  # (C, D)
    visual = copy.deepcopy(model.visual).float()
    projection = visual.head
    if isinstance(projection, nn.Linear):
        weight = columns @ projection.weight  # (C, D) @ (D, width) -> (C, width)
        bias = columns @ projection.bias if projection.bias is not None else torch.zeros(len(columns))
    else:  # no projection (SigLIP's image tower ends in the joint space)
        weight, bias = columns, torch.zeros(len(columns))
    if model.logit_bias is not None:
        bias = bias + model.logit_bias.float()
    visual.reset_classifier(len(class_names))
    visual.head.weight.copy_(weight)
    visual.head.bias.copy_(bias)
    cfg = dict(getattr(visual, "pretrained_cfg", None) or getattr(model, "pretrained_cfg", None) or {})
    visual.pretrained_cfg = {**cfg, "num_classes": len(class_names), "class_names": list(class_names)}
    return visual


@torch.no_grad()
def wise_ft(zeroshot: VisionTransformer, finetuned: VisionTransformer, alpha: float) -> VisionTransformer:
    """The weight-space ensemble: every floating-point tensor ``lerp(zeroshot, finetuned, alpha)`` (alpha 0 gives
    the zero-shot weights exactly, 1 the fine-tuned ones); the two must have the same architecture.

    Example:
        >>> a = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> b = VisionTransformer(a.config)
        >>> torch.equal(wise_ft(a, b, 1.0).head.weight, b.head.weight)
        True
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha: expected a value in [0, 1], got {alpha}")
    ours, theirs = zeroshot.state_dict(), finetuned.state_dict()
    problems = [f"only in the zero-shot model: {k}" for k in sorted(set(ours) - set(theirs))]
    problems += [f"only in the fine-tuned model: {k}" for k in sorted(set(theirs) - set(ours))]
    problems += [f"{k}: zero-shot {list(v.shape)} vs fine-tuned {list(theirs[k].shape)}" for k, v in ours.items()
                 if k in theirs and v.shape != theirs[k].shape]
    if problems:
        raise ValueError("WiSE-FT needs the zero-shot and the fine-tuned model to have one architecture:\n  "
                         + "\n  ".join(problems[:10]))
    mixed = {k: torch.lerp(v.float(), theirs[k].float(), alpha).to(v.dtype) if v.is_floating_point() else v
             for k, v in ours.items()}
    # lerp is exact at both ends (start + 0 * d at 0, end - 0 * d at 1); state it rather than trust rounding
    if alpha in (0.0, 1.0):
        mixed = dict(ours if alpha == 0.0 else theirs)
    model = copy.deepcopy(finetuned)
    model.load_state_dict(mixed)
    return model


@torch.no_grad()
def folder_accuracy(model: VisionTransformer, images: str | os.PathLike, class_names: Sequence[str],
                    batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on a folder of class sub-folders (named as ``class_names``), preprocessed as its
    ``pretrained_cfg`` says."""
    from ..data.transforms import eval_transform
    from .extract import ImageFiles, collect_images
    samples, folder_classes, _ = collect_images(images)
    if folder_classes is None:
        raise ValueError(f"{images}: expected a folder of class folders")
    unknown = [name for name in folder_classes if name not in class_names]
    if unknown:
        raise ValueError(f"{images}: class folders {unknown} are not among the model's classes {list(class_names)}")
    labels = torch.tensor([list(class_names).index(folder_classes[label]) for _, label in samples])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    transform = eval_transform(model.img_size, cfg.get("mean") or (0.5,) * 3, cfg.get("std") or (0.5,) * 3,
                               crop_pct=cfg.get("crop_pct") or 1.0)
    dataset = ImageFiles([path for path, _ in samples], transform, model.in_chans, model.img_size)
    model.eval()
    correct = total = 0
    for batch, index, reasons in DataLoader(dataset, batch_size=batch_size):
        keep = torch.tensor([not reason for reason in reasons])
        predicted = model(batch).argmax(dim=1)
        correct += int((predicted == labels[index])[keep].sum())
        total += int(keep.sum())
    return correct / max(total, 1)


def plot_sweep(alphas: Sequence[float], accuracies: Sequence[float], path: Path) -> Path:
    """The WiSE-FT curve: accuracy on a labelled folder against alpha (0 = zero-shot, 1 = fine-tuned)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend
    figure = Figure(figsize=(4.5, 3.2))
    axes = figure.subplots()
    axes.plot(list(alphas), list(accuracies), marker="o")
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel("accuracy on the folder")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def finetune_prompts(checkpoint: str | os.PathLike) -> tuple[list[str] | None, str | list[str] | None]:
    """(class prompts, templates) an ``ImageClassifier`` checkpoint was zero-shot initialised with, or Nones for a
    checkpoint that does not record them (a ``save_pretrained`` folder, a bare state dict)."""
    path = Path(checkpoint)
    if not path.is_file():
        return None, None
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
    except Exception:  # noqa: BLE001 — not a Lightning checkpoint: the caller names classes and templates
        return None, None
    return hparams.get("class_prompts"), hparams.get("templates")
