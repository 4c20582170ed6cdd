"""ImageClassifier: the LightningModule that trains a VisionTransformer."""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from ..training.optim import scaled_param_groups
from ..utils.ranges import (ClosedUnitInterval, Fraction, NonNegativeFloat, OpenUnitInterval, PositiveFloat, plain,
                            range_problems)
from .backbone import Backbone, freeze_layers  # noqa: F401  (freeze_layers: re-exported)
from .common import (  # noqa: F401  (ClassMismatchError, NonFiniteLossError: re-exported)
    ClassMismatchError, NonFiniteLossError, TaskCheckpoints, TrainingFeatures, training_feature_problems)


class ImageClassifier(TaskCheckpoints, TrainingFeatures, L.LightningModule):
    """Train a ViT classifier: cross-entropy with label smoothing, AdamW (no decay on embeddings, norms,
    biases), linear warm-up + cosine decay per step, top-1/top-5 accuracy.

    The network is described by ``backbone`` (``model.backbone.*`` in a recipe: architecture name, any
    ``ViTConfig`` override, pretrained source, freezing, layer decay); this module adds the head of
    ``num_classes`` outputs and everything about training it. Fine-tuning extras: Mixup/CutMix
    (``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``, ``switch_prob``; soft-target loss) and ``ema_decay`` (EMA
    weights are validated, tested and checkpointed; raw ones kept for resuming).

    Args:
        backbone: the ViT: ``arch``, ``pretrained``, ``freeze``, ``layer_decay``, ``grad_checkpointing`` and any
            ``ViTConfig`` field (``embed_dim``, ``depth``, ``img_size`` ...); see ``vit.tasks.backbone.Backbone``.
        num_classes: number of classes of the head (the CLI links it from data.num_classes).
        class_names: class names saved in checkpoints for prediction (the CLI links them from data.class_names).
        lr: peak AdamW learning rate, reached after the warm-up (scaled per layer by backbone.layer_decay).
        weight_decay: AdamW weight decay; never applied to position embeddings, class token, norms and biases.
        betas: AdamW's (beta1, beta2).
        warmup_epochs: epochs of linear learning-rate warm-up (fractions allowed; at most half of training).
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of lr.
        label_smoothing: label smoothing of the cross-entropy (and of the Mixup/CutMix targets).
        compile: torch.compile the model (in place, so checkpoint keys do not change).
        mixup_alpha: Mixup's Beta(alpha, alpha) parameter; 0 = no Mixup.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 = no CutMix.
        mix_prob: probability of mixing a batch when mixup_alpha or cutmix_alpha is > 0.
        switch_prob: probability of CutMix instead of Mixup when both are on.
        ema_decay: decay of an exponential moving average of the weights, used for validation and test; None = off.
        nonfinite_loss: on a NaN/inf training loss, "error" stops the run, "skip" skips the batch (and counts it).
        schedule: "epochs": warm-up + cosine over trainer.max_epochs; "budget": the cosine decays over the time
            trainer.max_time allows (less a reserve for the last validation), whatever the step rate; use it with
            trainer.max_epochs -1.
        head_init: "random", or "zeroshot": backbone.pretrained is a CLIP / SigLIP model (anything
            vit.load_image_text reads) and the head starts as its zero-shot classifier (the text embeddings of
            the classes, scaled by logit_scale; see vit.features.wise), so epoch 0 scores the zero-shot accuracy.
        class_prompts: head_init zeroshot: the words put in the templates for each class (default: class_names).
        templates: head_init zeroshot: "openai" (80), "simple", a file of templates or a list, each with one {}.

    Example:
        >>> module = ImageClassifier(Backbone(arch="vit_tiny_patch16_224", img_size=32, depth=2), num_classes=10)
        >>> module.model.embed_dim, module.model.num_classes
        (192, 10)
    """

    def __init__(self, backbone: Backbone = Backbone(), num_classes: int = 1000, class_names: list[str] | None = None,
                 lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_epochs: NonNegativeFloat = 1.0,
                 min_lr_ratio: Fraction = 0.01, label_smoothing: Fraction = 0.1, compile: bool = False,
                 mixup_alpha: NonNegativeFloat = 0.0, cutmix_alpha: NonNegativeFloat = 0.0,
                 mix_prob: ClosedUnitInterval = 1.0, switch_prob: ClosedUnitInterval = 0.5,
                 ema_decay: OpenUnitInterval | None = None,
                 nonfinite_loss: Literal["error", "skip"] = "error", schedule: Literal["epochs", "budget"] = "epochs",
                 head_init: Literal["random", "zeroshot"] = "random", class_prompts: list[str] | None = None,
                 templates: str | list[str] = "openai"):
        super().__init__()
        (lr, weight_decay, warmup_epochs, min_lr_ratio, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob,
         switch_prob, ema_decay) = plain(lr, weight_decay, warmup_epochs, min_lr_ratio, label_smoothing, mixup_alpha,
                                         cutmix_alpha, mix_prob, switch_prob, ema_decay)
        self.backbone = Backbone.from_value(backbone)
        backbone = self.backbone.as_dict()  # checkpoints hold plain values (they are read with weights_only=True)
        self.save_hyperparameters()  # reads the (now plain) arguments from this frame
        _check_training_args(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                             min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, nonfinite_loss=nonfinite_loss,
                             schedule=schedule)
        _check_finetune_args(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mix_prob=mix_prob,
                             switch_prob=switch_prob, ema_decay=ema_decay)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names but model.num_classes is {num_classes}")
        self.class_names = list(class_names) if class_names is not None else None
        # Built (and pretrained weights read) here, never in on_fit_start: a resumed .ckpt is restored after
        # __init__ and must win.
        self.model = self.backbone.build(num_classes) if head_init != "zeroshot" else \
            _zeroshot_model(self.backbone, class_prompts or class_names, templates, num_classes)
        self.mixup = _mixup(self.hparams)
        # Lightning's model summary runs this once through the model, so its FLOPs column counts (not zeros)
        self.example_input_array = torch.zeros(1, self.model.in_chans, *self.model.img_size)
        top_k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        # read by vit.training.callbacks.TestReport (confusion matrix PNG, per-class CSV)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_per_class = MetricCollection({
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None)})
        if compile:
            self.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, soft_targets = mix_batch(self.mixup, images, targets)
            logits = self(images)
            loss = torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        # One host sync on a scalar the progress bar reads anyway; it must happen before the optimizer step.
        if not torch.isfinite(loss):
            return self.nonfinite(loss, batch_idx)
        self.train_acc(logits.detach(), targets)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.val_acc(logits, targets)
        self.val_acc5(logits, targets)
        self.log("val/loss", F.cross_entropy(logits, targets), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/acc_top5", self.val_acc5)

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.test_acc(logits, targets)
        self.test_acc5(logits, targets)
        self.test_confmat(logits, targets)
        self.test_per_class(logits, targets)
        self.log("test/loss", F.cross_entropy(logits, targets), sync_dist=True)
        self.log("test/acc", self.test_acc)
        self.log("test/acc_top5", self.test_acc5)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = scaled_param_groups(self.model, hp.lr, hp.weight_decay, self.backbone.layer_decay)
        # fused AdamW: one kernel per step instead of a loop over tensors (CPU and CUDA in torch >= 2.4)
        # ...but Lightning refuses gradient clipping with a fused optimizer (it unscales internally)
        fused = _fused_supported(self) and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}

    def configure_callbacks(self):
        from ..training.callbacks import PredictionWriter, TestReport
        stage = getattr(self.trainer.state.fn, "value", self.trainer.state.fn)  # TrainerFn -> 'fit'
        kind = {"test": TestReport, "predict": PredictionWriter}.get(stage)
        if kind is None:
            return super().configure_callbacks()  # EMA weights while fitting, if asked for
        # one the trainer already has (configured in a recipe) wins over ours
        return [] if any(isinstance(c, kind) for c in self.trainer.callbacks) else [kind()]

    def checkpoint_backbone(self):
        return self.model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if (checkpoint.get("hyper_parameters") or {}).get("head_init") == "zeroshot":
            checkpoint["hyper_parameters"]["head_init"] = "random"  # the head is in the weights now


def _zeroshot_model(backbone: Backbone, class_prompts: list[str] | None, templates, num_classes: int):
    """The image tower of the image-text model ``backbone.pretrained`` with its zero-shot head for the classes."""
    from ..checkpoints import load_image_text
    from ..features.wise import zeroshot_head_model
    if not backbone.pretrained:
        raise ValueError("model.head_init: zeroshot needs model.backbone.pretrained: a CLIP / SigLIP model (anything "
                         "vit.load_image_text reads)")
    if class_prompts is None or len(class_prompts) != num_classes:
        raise ValueError(f"model.head_init: zeroshot needs one prompt per class: model.class_prompts (or the data's "
                         f"class names) gives {None if class_prompts is None else len(class_prompts)} for "
                         f"{num_classes} classes")
    model = zeroshot_head_model(load_image_text(backbone.pretrained), class_prompts, templates)
    have = model.config.to_dict()
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.overrides().items()}
    differ = {k: v for k, v in wanted.items() if v != have[k]}
    if differ:
        raise ValueError("model.head_init: zeroshot keeps the image tower as trained, but the recipe asks for "
                         + ", ".join(f"{k} {v} (it has {have[k]}; data.{k} sets it)" if k in ("img_size", "in_chans")
                                     else f"{k} {v} (it has {have[k]})" for k, v in differ.items())
                         + "; remove these model.backbone keys")
    model.set_grad_checkpointing(backbone.grad_checkpointing)
    freeze_layers(model, backbone.freeze)
    return model


def _mixup(hparams: Any):
    if not (hparams.mixup_alpha > 0 or hparams.cutmix_alpha > 0) or hparams.mix_prob == 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=hparams.mixup_alpha, cutmix_alpha=hparams.cutmix_alpha, prob=hparams.mix_prob,
                 switch_prob=hparams.switch_prob, label_smoothing=hparams.label_smoothing,
                 num_classes=hparams.num_classes)


def mix_batch(mixup, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Mixup/CutMix on a batch: (mixed images, soft targets summing to 1). timm needs an even batch, so
    an odd last batch mixes all but its last image, which keeps its own (smoothed) one-hot target."""
    if len(images) < 2:
        return images, _smoothed(targets, mixup.num_classes, mixup.label_smoothing)
    even = len(images) - len(images) % 2
    mixed, soft = mixup(images[:even].clone(), targets[:even])
    if even == len(images):
        return mixed, soft
    last = _smoothed(targets[even:], mixup.num_classes, mixup.label_smoothing)
    return torch.cat([mixed, images[even:]]), torch.cat([soft, last.to(soft.dtype)])


def _smoothed(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(
        1, targets.view(-1, 1), 1.0 - smoothing + off)


def _fused_supported(module: L.LightningModule) -> bool:
    device = next(module.parameters()).device
    return device.type in ("cpu", "cuda")


def _check_training_args(**values: Any) -> None:
    problems = range_problems("model", {
        "lr": (PositiveFloat, values["lr"]), "weight_decay": (NonNegativeFloat, values["weight_decay"]),
        "warmup_epochs": (NonNegativeFloat, values["warmup_epochs"]),
        "min_lr_ratio": (Fraction, values["min_lr_ratio"]), "label_smoothing": (Fraction, values["label_smoothing"])})
    # ema_decay is checked with the fine-tuning settings
    problems += training_feature_problems(schedule=values["schedule"], ema_decay=None,
                                          nonfinite_loss=values["nonfinite_loss"])
    if problems:
        raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))


def _check_finetune_args(*, mixup_alpha, cutmix_alpha, mix_prob, switch_prob, ema_decay) -> None:
    problems = range_problems("model", {
        "mixup_alpha": (NonNegativeFloat, mixup_alpha), "cutmix_alpha": (NonNegativeFloat, cutmix_alpha),
        "mix_prob": (ClosedUnitInterval, mix_prob), "switch_prob": (ClosedUnitInterval, switch_prob),
        "ema_decay": (OpenUnitInterval, ema_decay)})
    if problems:
        raise ValueError("invalid fine-tuning configuration:\n  " + "\n  ".join(problems))
