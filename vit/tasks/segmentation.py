"""Segmenter: the LightningModule that trains a semantic segmentation head (linear, multi-scale linear or a DPT
decoder, ``vit.tasks.heads``) on a ViT and scores it with mIoU, per-class IoU and pixel accuracy."""
from __future__ import annotations

import csv
import dataclasses
import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from ..training.callbacks import run_dir
from ..utils.ranges import (Fraction, NonNegativeFloat, OpenUnitInterval, PositiveFloat, PositiveInt, plain,
                           range_problems)
from .backbone import Backbone
from .common import TaskCheckpoints, TrainingFeatures, training_feature_problems
from .heads import HEADS, SegmentationModel, sliding_window
from .pyramid import norm_and_bias_names

REPORT_NAME = "per_class_iou.csv"  # written in the run directory after trainer.test


class Segmenter(TaskCheckpoints, TrainingFeatures, L.LightningModule):
    """Train semantic segmentation on a ViT: cross-entropy (``ignore_index`` pixels left out, optional class
    weights), AdamW with layer-wise LR decay, linear warm-up + cosine decay; mIoU, per-class IoU and pixel accuracy
    from one torchmetrics confusion matrix per split (summed over ranks).

    ``model.backbone.freeze: backbone`` trains the head alone on frozen features (DINOv2's linear protocol with
    ``head: linear`` or ``linear_ms``); otherwise everything trains, with ``backbone.layer_decay`` if set. Images
    are float tensors in [0, 1]: the model normalises them itself with the pretrained weights' mean/std (ImageNet's
    if they record none). Validation, test and prediction run in sliding windows of ``window`` pixels every
    ``stride`` (logits averaged where they overlap); a window covering the image is one pass.

    Args:
        backbone: the ViT (``arch``, ``pretrained``, ``freeze``, ``layer_decay``, ``grad_checkpointing``, ViTConfig
            overrides); see ``vit.tasks.backbone.Backbone``.
        num_classes: classes of the masks (the CLI links it from data.num_classes).
        class_names: class names saved in checkpoints for prediction (the CLI links them from data.class_names).
        head: "linear" (last block), "linear_ms" (4 evenly spaced blocks) or "dpt" (a small DPT decoder).
        head_channels: width of the dpt decoder.
        image_size: side of the square training crops (the CLI links it from data.img_size); the ViT is built at
            this size; None = the backbone's img_size.
        ignore_index: mask value left out of the loss and the metrics (the CLI links it from data.ignore_index).
        class_weights: one cross-entropy weight per class; None = all 1.
        window: sliding-window side for validation, test and prediction; None = image_size.
        stride: sliding-window step; None = two thirds of the window.
        lr: peak AdamW learning rate, reached after the warm-up (scaled per layer by backbone.layer_decay).
        weight_decay: AdamW weight decay; never applied to position embeddings, tokens, norms and biases.
        warmup_epochs: epochs of linear learning-rate warm-up (fractions allowed; at most half of training).
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of lr.
        ema_decay: decay of an exponential moving average of the weights, used for validation, test and the
            checkpoints; None = off.
        schedule: "epochs": warm-up + cosine over trainer.max_epochs; "budget": the cosine decays over the time
            trainer.max_time allows (set trainer.max_epochs -1), whatever this machine's step rate is.
        nonfinite_loss: on a NaN/inf training loss, "error" stops the run naming the step and learning rate;
            "skip" skips the batch (counted in train/nonfinite_skipped).

    Example:
        >>> module = Segmenter(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ...                    num_classes=4, head="linear_ms")
        >>> tuple(module(torch.rand(1, 3, 40, 29)).shape)
        (1, 4, 40, 29)
    """

    def __init__(self, backbone: Backbone = Backbone(), num_classes: int = 150, class_names: list[str] | None = None,
                 head: Literal["linear", "linear_ms", "dpt"] = "linear", head_channels: PositiveInt = 128,
                 image_size: PositiveInt | None = None, ignore_index: int = 255,
                 class_weights: list[float] | None = None, window: PositiveInt | None = None,
                 stride: PositiveInt | None = None, lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 0.05,
                 warmup_epochs: NonNegativeFloat = 1.0, min_lr_ratio: Fraction = 0.01,
                 ema_decay: OpenUnitInterval | None = None, schedule: Literal["epochs", "budget"] = "epochs",
                 nonfinite_loss: Literal["error", "skip"] = "error"):
        super().__init__()
        (head_channels, image_size, window, stride, lr, weight_decay, warmup_epochs, min_lr_ratio, ema_decay) = plain(
            head_channels, image_size, window, stride, lr, weight_decay, warmup_epochs, min_lr_ratio, ema_decay)
        class_weights = [float(w) for w in class_weights] if class_weights is not None else None
        self.backbone = Backbone.from_value(backbone)
        backbone = self.backbone.as_dict()  # checkpoints hold plain values (read with weights_only=True)
        self.save_hyperparameters()
        _check_args(num_classes=num_classes, class_names=class_names, head=head, ignore_index=ignore_index,
                    class_weights=class_weights, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                    min_lr_ratio=min_lr_ratio, ema_decay=ema_decay, schedule=schedule, nonfinite_loss=nonfinite_loss)
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        # Built (and pretrained weights read) here: a resumed .ckpt is restored after __init__ and must win.
        size = image_size if image_size is not None else (
            None if self.backbone.pretrained and self.backbone.img_size is None
            else self.backbone.img_size or self.backbone.config().img_size)
        vit = dataclasses.replace(self.backbone, img_size=size, dynamic_img_size=True).build(num_classes=0)
        self.image_size = vit.img_size[0]
        self.window = window or self.image_size
        self.stride = stride or max(1, self.window * 2 // 3)
        self.model = SegmentationModel(vit, num_classes, head, head_channels)
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None,
                             persistent=False)
        self.example_input_array = torch.zeros(1, vit.in_chans, *vit.img_size)
        self.val_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
        self.test_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) at the images' size, in one pass."""
        return self.model(images)

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) from sliding windows of ``window`` pixels every ``stride`` (one pass when it covers
        the image)."""
        return sliding_window(self.model, images, self.window, self.stride)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the pixels that are not ``ignore_index`` (0 with a graph when there are none)."""
        if not (masks != self.ignore_index).any():
            return logits.sum() * 0.0  # an all-ignore crop: nothing to learn, and no NaN from a mean over nothing
        return F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.ignore_index)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        loss = self.loss(self(images), masks)
        if not torch.isfinite(loss):
            return self.nonfinite(loss, batch_idx)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch, confmat: MulticlassConfusionMatrix, split: str) -> None:
        images, masks = batch
        logits = self.predict_logits(images)
        self.log(f"{split}/loss", self.loss(logits, masks), sync_dist=True, batch_size=len(images))
        confmat.update(logits.argmax(dim=1).flatten(), masks.flatten())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_confmat, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_confmat, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_logits(images).argmax(dim=1)

    def on_validation_epoch_end(self) -> None:
        self.epoch_scores(self.val_confmat, "val")

    def on_test_epoch_end(self) -> None:
        matrix = self.test_confmat.compute()  # summed over ranks by torchmetrics
        self.epoch_scores(self.test_confmat, "test", matrix)
        if self._trainer is not None and self.trainer.is_global_zero and self.trainer.log_dir is not None:
            write_iou_report(matrix, self.class_names, run_dir(self.trainer) / REPORT_NAME)

    def epoch_scores(self, confmat: MulticlassConfusionMatrix, split: str,
                     matrix: torch.Tensor | None = None) -> dict[str, float]:
        """Log ``<split>/miou`` and ``<split>/pixel_acc`` from the confusion matrix, reset it; returns them."""
        matrix = confmat.compute() if matrix is None else matrix
        confmat.reset()
        scores = segmentation_scores(matrix)
        values = {f"{split}/miou": scores["miou"], f"{split}/pixel_acc": scores["pixel_acc"]}
        if self._trainer is not None:
            for name, value in values.items():
                # computed from the matrix summed over ranks: every rank holds the same value already
                self.log(name, value, prog_bar=name.endswith("miou"), sync_dist=False)
        return values

    # ---- optimisation ----------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """The ViT's no-decay names, and every bias and norm parameter of the head."""
        return ({f"model.vit.{n}" for n in self.model.vit.no_weight_decay()}
                | {f"model.head.{n}" for n in norm_and_bias_names(self.model.head)})

    def layer_ids(self) -> dict[str, int]:
        """Depth of every parameter for layer-wise LR decay: the ViT's layers, the head on top."""
        ids = {f"model.vit.{n}": i for n, i in self.model.vit.layer_ids().items()}
        top = max(ids.values(), default=0) + 1
        return {n: ids.get(n, top) for n, _ in self.named_parameters()}

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint_backbone(self):
        return self.model.vit


def segmentation_scores(matrix: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """From a confusion matrix (rows: true class, columns: predicted): ``iou`` per class (NaN for a class neither
    present nor predicted), ``miou`` (the mean over the other classes), ``pixel_acc`` and ``pixels`` per class.

    Example:
        >>> scores = segmentation_scores(torch.tensor([[3, 1], [0, 4]]))
        >>> [round(v, 4) for v in scores["iou"].tolist()], round(scores["miou"], 4), scores["pixel_acc"]
        ([0.75, 0.8], 0.775, 0.875)
    """
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    valid = ~iou.isnan()
    return {"iou": iou, "miou": float(iou[valid].mean()) if valid.any() else 0.0,
            "pixel_acc": float(hits.sum() / matrix.sum().clamp(min=1)), "pixels": matrix.sum(1).long()}


def write_iou_report(matrix: torch.Tensor, class_names: list[str] | None, path) -> None:
    """``class, iou, pixels`` (true pixels of the class) rows, an empty iou where the class never occurs."""
    scores = segmentation_scores(matrix.cpu())
    names = class_names or [str(i) for i in range(matrix.shape[0])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["class", "iou", "pixels"])
        for name, iou, pixels in zip(names, scores["iou"].tolist(), scores["pixels"].tolist()):
            writer.writerow([name, "" if math.isnan(iou) else f"{iou:.4f}", int(pixels)])


def _check_args(*, num_classes, class_names, head, ignore_index, class_weights, lr, weight_decay, warmup_epochs,
                min_lr_ratio, ema_decay, schedule, nonfinite_loss) -> None:
    problems = range_problems("model", {"lr": (PositiveFloat, lr), "weight_decay": (NonNegativeFloat, weight_decay),
                                        "warmup_epochs": (NonNegativeFloat, warmup_epochs),
                                        "min_lr_ratio": (Fraction, min_lr_ratio)})
    problems += training_feature_problems(schedule=schedule, ema_decay=ema_decay, nonfinite_loss=nonfinite_loss)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        problems.append(f"model.num_classes: expected a positive integer, got {num_classes!r}")
    else:
        if class_names is not None and len(class_names) != num_classes:
            problems.append(f"model.class_names has {len(class_names)} names but model.num_classes is {num_classes}")
        if class_weights is not None and (len(class_weights) != num_classes or min(class_weights) < 0):
            problems.append(f"model.class_weights: expected {num_classes} non-negative weights (one per class), got "
                            f"{class_weights}")
        if 0 <= ignore_index < num_classes:
            problems.append(f"model.ignore_index {ignore_index} is one of the classes 0..{num_classes - 1}")
    if head not in HEADS:
        problems.append(f"model.head: expected one of {', '.join(HEADS)}, got {head!r}")
    if problems:
        raise ValueError("invalid segmentation configuration:\n  " + "\n  ".join(problems))
