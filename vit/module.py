"""ImageClassifier: the LightningModule that trains a VisionTransformer."""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from .model import VisionTransformer
from .optim import param_groups, warmup_cosine
from .registry import model_config

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
             "drop_rate", "attn_drop_rate", "drop_path_rate", "global_pool", "class_token")


class ImageClassifier(L.LightningModule):
    """Train a ViT classifier: cross-entropy with label smoothing, AdamW (no decay on embeddings, norms,
    biases), linear warm-up + cosine decay per step, top-1/top-5 accuracy.

    The architecture is a registered name (``arch``) and/or explicit hyper-parameters; explicit values win.

    Example:
        >>> module = ImageClassifier(arch="vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
        >>> module.model.embed_dim, module.model.num_classes
        (192, 10)
    """

    def __init__(self, arch: str | None = None, num_classes: int = 1000, img_size: int | None = None,
                 patch_size: int | None = None, in_chans: int = 3, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, mlp_ratio: float | None = None,
                 qkv_bias: bool | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: Literal["token", "avg"] | None = None,
                 class_token: bool | None = None, class_names: list[str] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_epochs: float = 1.0, min_lr_ratio: float = 0.01, label_smoothing: float = 0.1,
                 layer_decay: float | None = None, grad_checkpointing: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        _check_training_args(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                             min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, layer_decay=layer_decay)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names but model.num_classes is {num_classes}")
        self.class_names = list(class_names) if class_names is not None else None
        self.model = build_model(self.hparams)
        self.model.set_grad_checkpointing(grad_checkpointing)
        top_k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        if compile:
            self.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
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
        self.log("test/loss", F.cross_entropy(logits, targets), sync_dist=True)
        self.log("test/acc", self.test_acc)
        self.log("test/acc_top5", self.test_acc5)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, hp.layer_decay)
        for group in groups:
            group["lr"] = hp.lr * group["lr_scale"]
            group.pop("names")
        # fused AdamW: one kernel per step instead of a loop over tensors (CPU and CUDA in torch >= 2.4)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=_fused_supported(self))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = int(round(hp.warmup_epochs * total / max_epochs))
        warmup = min(warmup, total // 2)
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names


def build_model(hparams: Any) -> VisionTransformer:
    """VisionTransformer from a registered ``arch`` and explicit overrides (``None`` = not given)."""
    hp = dict(hparams)
    config = model_config(hp["arch"]) if hp.get("arch") else {}
    for key in ARCH_KEYS:
        if hp.get(key) is not None:
            config[key] = hp[key]
    config["num_classes"] = hp["num_classes"]
    return VisionTransformer(**config)


def _fused_supported(module: L.LightningModule) -> bool:
    device = next(module.parameters()).device
    return device.type in ("cpu", "cuda")


def _check_training_args(**values: float | None) -> None:
    problems = []
    if not values["lr"] > 0:
        problems.append(f"model.lr: expected > 0, got {values['lr']}")
    for key in ("weight_decay", "warmup_epochs"):
        if values[key] < 0:
            problems.append(f"model.{key}: expected >= 0, got {values[key]}")
    for key in ("min_lr_ratio", "label_smoothing"):
        if not 0 <= values[key] < 1:
            problems.append(f"model.{key}: expected a value in [0, 1), got {values[key]}")
    if values["layer_decay"] is not None and not 0 < values["layer_decay"] <= 1:
        problems.append(f"model.layer_decay: expected a value in (0, 1], got {values['layer_decay']}")
    if problems:
        raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))
