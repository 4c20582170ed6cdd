"""ImageClassifier: the LightningModule that trains a VisionTransformer."""
from __future__ import annotations

import inspect
import time
from typing import Any, Literal, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from .checkpoints import load_pretrained
from .config import ViTConfig, field_names
from .model import VisionTransformer
from .optim import TimeBudgetCosine, param_groups, warmup_cosine
from .ranges import (ClosedUnitInterval, DecayFactor, Fraction, NonNegativeFloat, OpenUnitInterval, PositiveFloat,
                     plain, range_problems)
from .registry import model_config



class ImageClassifier(L.LightningModule):
    """Train a ViT classifier: cross-entropy with label smoothing, AdamW (no decay on embeddings, norms,
    biases), linear warm-up + cosine decay per step, top-1/top-5 accuracy.

    The architecture is a registered name (``arch``) and/or explicit hyper-parameters; explicit values win.
    Fine-tuning: ``pretrained`` (anything ``vit.load_pretrained`` accepts; head re-initialised for
    ``num_classes``, position embeddings resampled to ``img_size``), ``layer_decay``, ``freeze``
    (``"none"``, ``"backbone"`` = train the head only, or N = freeze embeddings + the first N blocks),
    Mixup/CutMix (``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``, ``switch_prob``; soft-target loss) and
    ``ema_decay`` (EMA weights are validated, tested and checkpointed; raw ones kept for resuming).

    Args:
        arch: registered architecture to start from (see vit.list_models()); None = VisionTransformer's defaults.
        num_classes: number of classes of the head (the CLI links it from data.num_classes).
        img_size: input image size (the CLI links it from data.img_size); None = the architecture's.
        patch_size: side of the square patches; None = the architecture's.
        in_chans: number of input image channels (the CLI links it from data.in_chans).
        embed_dim: token width; None = the architecture's.
        depth: number of transformer blocks; None = the architecture's.
        num_heads: attention heads per block (must divide embed_dim); None = the architecture's.
        mlp_ratio: hidden width of each block's MLP as a multiple of embed_dim; None = the architecture's.
        qkv_bias: give the query/key/value projection a bias; None = the architecture's.
        drop_rate: dropout after the position embeddings, on each block's attention and MLP output, before the head.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first block.
        global_pool: what the head reads: "token" (class token), "avg" (mean of patch tokens), "map" (attention
            pooling, SigLIP) or "" (all tokens); None = the architecture's.
        class_token: prepend a learned class token; None = the architecture's.
        fc_norm: final LayerNorm after pooling instead of on all tokens; None = the architecture's (timm's rule).
        norm_eps: epsilon of every LayerNorm; None = the architecture's.
        dynamic_img_size: accept any input size, resampling position embeddings per call; None = the arch's.
        init_values: LayerScale start value (DINOv2 1e-5, DeiT III 1e-6); None = the architecture's.
        reg_tokens: register tokens after the class token (DINOv2 reg4: 4); None = the architecture's.
        no_embed_class: position embeddings for the patches only (DeiT III, DINOv2 reg); None = the arch's.
        pre_norm: LayerNorm after the position embedding, no patch bias (CLIP); None = the architecture's.
        final_norm: the final LayerNorm at all; None = the architecture's.
        act_layer: MLP activation: gelu, gelu_tanh (SigLIP), quick_gelu (OpenAI CLIP), silu; None = the arch's.
        mlp_layer: "mlp" or "swiglu" (DINOv2 giant); None = the architecture's.
        embed_layer: "conv" or "spt" (Shifted Patch Tokenization, for small datasets); None = the architecture's.
        attn_layer: "mha" or "lsa" (Locality Self-Attention, for small datasets); None = the architecture's.
        class_names: class names saved in checkpoints for prediction (the CLI links them from data.class_names).
        lr: peak AdamW learning rate, reached after the warm-up (scaled per layer by layer_decay).
        weight_decay: AdamW weight decay; never applied to position embeddings, class token, norms and biases.
        betas: AdamW's (beta1, beta2).
        warmup_epochs: epochs of linear learning-rate warm-up (fractions allowed; at most half of training).
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of lr.
        label_smoothing: label smoothing of the cross-entropy (and of the Mixup/CutMix targets).
        layer_decay: layer-wise LR decay: the head gets lr, each layer below it this factor more; None = off.
        grad_checkpointing: recompute block activations in backward: less memory, about a third more compute.
        compile: torch.compile the model (in place, so checkpoint keys do not change).
        pretrained: weights to fine-tune (anything vit.load_pretrained reads: file, directory, hf-hub:/timm: name).
        freeze: "none", "backbone" (train the head only: linear probe) or N (freeze embeddings + the first N blocks).
        mixup_alpha: Mixup's Beta(alpha, alpha) parameter; 0 = no Mixup.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 = no CutMix.
        mix_prob: probability of mixing a batch when mixup_alpha or cutmix_alpha is > 0.
        switch_prob: probability of CutMix instead of Mixup when both are on.
        ema_decay: decay of an exponential moving average of the weights, used for validation and test; None = off.
        nonfinite_loss: on a NaN/inf training loss, "error" stops the run, "skip" skips the batch (and counts it).
        schedule: "epochs": warm-up + cosine over trainer.max_epochs; "budget": the cosine decays over the time
            trainer.max_time allows (less a reserve for the last validation), whatever the step rate; use it with
            trainer.max_epochs -1.

    Example:
        >>> module = ImageClassifier(arch="vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
        >>> module.model.embed_dim, module.model.num_classes
        (192, 10)
    """

    def __init__(self, arch: str | None = None, num_classes: int = 1000, img_size: int | None = None,
                 patch_size: int | None = None, in_chans: int = 3, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, mlp_ratio: float | None = None,
                 qkv_bias: bool | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: Literal["token", "avg", "map", ""] | None = None,
                 class_token: bool | None = None, fc_norm: bool | None = None, norm_eps: float | None = None,
                 dynamic_img_size: bool | None = None, init_values: float | None = None,
                 reg_tokens: int | None = None, no_embed_class: bool | None = None, pre_norm: bool | None = None,
                 final_norm: bool | None = None,
                 act_layer: Literal["gelu", "gelu_tanh", "quick_gelu", "silu"] | None = None,
                 mlp_layer: Literal["mlp", "swiglu"] | None = None, embed_layer: Literal["conv", "spt"] | None = None,
                 attn_layer: Literal["mha", "lsa"] | None = None, class_names: list[str] | None = None,
                 lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_epochs: NonNegativeFloat = 1.0,
                 min_lr_ratio: Fraction = 0.01, label_smoothing: Fraction = 0.1,
                 layer_decay: DecayFactor | None = None, grad_checkpointing: bool = False, compile: bool = False,
                 pretrained: str | None = None, freeze: Union[int, Literal["none", "backbone"]] = "none",
                 mixup_alpha: NonNegativeFloat = 0.0, cutmix_alpha: NonNegativeFloat = 0.0,
                 mix_prob: ClosedUnitInterval = 1.0, switch_prob: ClosedUnitInterval = 0.5,
                 ema_decay: OpenUnitInterval | None = None,
                 nonfinite_loss: Literal["error", "skip"] = "error", schedule: Literal["epochs", "budget"] = "epochs"):
        super().__init__()
        (lr, weight_decay, warmup_epochs, min_lr_ratio, label_smoothing, layer_decay, mixup_alpha, cutmix_alpha,
         mix_prob, switch_prob, ema_decay) = plain(lr, weight_decay, warmup_epochs, min_lr_ratio, label_smoothing,
                                                   layer_decay, mixup_alpha, cutmix_alpha, mix_prob, switch_prob,
                                                   ema_decay)
        self.save_hyperparameters()  # reads the (now plain) arguments from this frame
        _check_training_args(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                             min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, layer_decay=layer_decay,
                             nonfinite_loss=nonfinite_loss)
        _check_finetune_args(freeze=freeze, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mix_prob=mix_prob,
                             switch_prob=switch_prob, ema_decay=ema_decay)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names but model.num_classes is {num_classes}")
        self.nonfinite_skipped = 0  # batches skipped for a NaN/inf loss (model.nonfinite_loss: skip)
        self._validation_seconds = 0.0  # the last validation's duration (model.schedule: budget keeps room for it)
        self.class_names = list(class_names) if class_names is not None else None
        # Loaded here, never in on_fit_start: a resumed .ckpt is restored after __init__ and must win.
        self.model = build_pretrained(self.hparams) if pretrained else build_model(self.hparams)
        self.model.set_grad_checkpointing(grad_checkpointing)
        freeze_layers(self.model, freeze)
        self.mixup = _mixup(self.hparams)
        top_k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        # read by vit.callbacks.TestReport (confusion matrix PNG, per-class CSV)
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
            return self._nonfinite(loss, batch_idx)
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
        groups = param_groups(self.model, hp.weight_decay, hp.layer_decay)
        for group in groups:
            group["lr"] = hp.lr * group["lr_scale"]
            group.pop("names")
        # fused AdamW: one kernel per step instead of a loop over tensors (CPU and CUDA in torch >= 2.4)
        # ...but Lightning refuses gradient clipping with a fused optimizer (it unscales internally)
        fused = _fused_supported(self) and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        if hp.schedule == "budget":
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._budget_schedule(optimizer),
                                                             "interval": "step"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = int(round(hp.warmup_epochs * total / max_epochs))
        warmup = min(warmup, total // 2)
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _budget_schedule(self, optimizer) -> LambdaLR:
        from lightning.pytorch.callbacks import Timer
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None:
            raise ValueError("model.schedule: budget decays the learning rate over a time budget: set "
                             "trainer.max_time (e.g. --trainer.max_time 00:00:20:00) and trainer.max_epochs -1")
        budget = timer.time_elapsed("train") + timer.time_remaining("train")

        def warmup_steps() -> int:
            batches = self.trainer.num_training_batches
            per_epoch = batches if batches != float("inf") else 0
            return int(round(self.hparams.warmup_epochs * per_epoch / max(1, self.trainer.accumulate_grad_batches)))

        def end() -> float:  # leave room for the validation that follows the last step
            return budget - min(1.5 * self._validation_seconds, 0.5 * budget)

        rule = TimeBudgetCosine(warmup_steps, self.hparams.min_lr_ratio, elapsed=lambda: timer.time_elapsed("train"),
                                end=end)
        # a plain function, which LambdaLR leaves out of its state_dict (the clock comes back with the Timer's)
        return LambdaLR(optimizer, lambda step: rule(step))

    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validation_seconds = time.perf_counter() - self._validation_started

    def configure_callbacks(self):
        from lightning.pytorch.callbacks import EMAWeightAveraging

        from .callbacks import PredictionWriter, TestReport
        stage = getattr(self.trainer.state.fn, "value", self.trainer.state.fn)  # TrainerFn -> 'fit'
        wanted = {"test": TestReport, "predict": PredictionWriter}
        if self.hparams.ema_decay:
            wanted["fit"] = EMAWeightAveraging
        kind = wanted.get(stage)
        # one the trainer already has (configured in a recipe) wins over ours
        if kind is None or any(isinstance(c, kind) for c in self.trainer.callbacks):
            return []
        return [EMAWeightAveraging(decay=self.hparams.ema_decay) if kind is EMAWeightAveraging else kind()]

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        step, optimizers = self.global_step, self.trainer.optimizers
        lrs = sorted({g["lr"] for g in optimizers[0].param_groups}) if optimizers else [self.hparams.lr]
        lr = f"{lrs[0]:.3g}" if len(lrs) == 1 else f"{lrs[0]:.3g}..{lrs[-1]:.3g}"
        where = f"at step {step} (epoch {self.current_epoch}, batch {batch_idx}), learning rate {lr}"
        if self.hparams.nonfinite_loss == "error":
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) {where}. Lower model.lr, raise "
                                     f"model.warmup_epochs, use precision 32-true or bf16-mixed, or set "
                                     f"model.nonfinite_loss: skip to skip such batches")
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        if self.nonfinite_skipped == 1:
            import warnings
            warnings.warn(f"skipping a batch with a non-finite loss {where}; further ones are counted in "
                          f"train/nonfinite_skipped", stacklevel=2)
        return None  # Lightning skips backward and the optimizer step for this batch

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs):
        """Lightning's ``load_from_checkpoint``, reading with ``weights_only=True`` unless told otherwise: our
        checkpoints hold tensors and plain values only, and this way a checkpoint carrying pickled code is refused
        even where torch's own default has been switched off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)."""
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint is read against the data's classes: a different list or order would mislabel everything.
        saved = checkpoint.get("class_names")
        if saved is not None and self.class_names is not None and list(saved) != list(self.class_names):
            raise ClassMismatchError(f"the checkpoint's classes differ from the data's:\n  checkpoint "
                                     f"({len(saved)}): {list(saved)}\n  data       ({len(self.class_names)}): "
                                     f"{list(self.class_names)}")
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and hparams.get("pretrained"):
            # The weights are in the checkpoint: record the loaded architecture instead of the source, so
            # load_from_checkpoint(path) works where the pretrained file is not.
            arch = self.model.config.to_dict()
            hparams.update(pretrained=None, arch=None, **{k: arch[k] for k in ARCH_KEYS})


# The architecture fields ImageClassifier takes (all of ViTConfig's but distilled: DeiT distillation needs a
# teacher, which this module does not train with); tests/test_module.py checks none is left out by accident.
ARCH_KEYS = tuple(k for k in field_names()
                  if k in inspect.signature(ImageClassifier.__init__).parameters and k != "num_classes")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (the message names the step and learning rate)."""


class ClassMismatchError(ValueError):
    """A checkpoint's class names differ from the data's (both lists in the message)."""


def build_model(hparams: Any) -> VisionTransformer:
    """VisionTransformer from a registered ``arch`` and explicit overrides (``None`` = not given)."""
    hp = dict(hparams)
    config = model_config(hp["arch"]) if hp.get("arch") else ViTConfig()
    given = {key: hp[key] for key in ARCH_KEYS if hp.get(key) is not None}
    return VisionTransformer(config, num_classes=hp["num_classes"], **given)


def build_pretrained(hparams: Any) -> VisionTransformer:
    """``hparams["pretrained"]`` loaded with ``vit.load_pretrained``: the head re-initialised for ``num_classes``,
    position embeddings resampled to ``img_size``; explicit architecture values are hints (e.g. ``num_heads`` for
    a bare state dict), dropout rates apply as given."""
    hp = dict(hparams)
    hints = {k: hp[k] for k in ARCH_KEYS if hp.get(k) is not None and k not in ("img_size", "patch_size")}
    return load_pretrained(hp["pretrained"], model=hints or None, num_classes=hp["num_classes"],
                           img_size=hp.get("img_size"), patch_size=hp.get("patch_size"))


def freeze_layers(model: VisionTransformer, freeze: int | str) -> None:
    """Stop gradients: ``"backbone"`` = all but the head (linear probe), N = patch/position embeddings, tokens
    and the first N blocks, ``"none"`` = nothing. Frozen parameters are left out of the optimizer.

    Example:
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
        >>> freeze_layers(m, "backbone"); sorted(n for n, p in m.named_parameters() if p.requires_grad)
        ['head.bias', 'head.weight']
    """
    if freeze in ("none", 0, "0", None):
        return
    depth = model.layer_ids(coarse=True)  # the final norm stays trainable until the head is frozen too
    for name, param in model.named_parameters():
        if freeze == "backbone":
            param.requires_grad_(name.startswith(("head.", "head_dist.")))
        elif depth[name] <= int(freeze):  # embeddings are depth 0, block i is depth i + 1
            param.requires_grad_(False)


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
        "min_lr_ratio": (Fraction, values["min_lr_ratio"]), "label_smoothing": (Fraction, values["label_smoothing"]),
        "layer_decay": (DecayFactor, values["layer_decay"])})
    if values["nonfinite_loss"] not in ("error", "skip"):
        problems.append(f"model.nonfinite_loss: expected 'error' or 'skip', got {values['nonfinite_loss']!r}")
    if problems:
        raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))


def _check_finetune_args(*, freeze, mixup_alpha, cutmix_alpha, mix_prob, switch_prob, ema_decay) -> None:
    problems = []
    if isinstance(freeze, str) and freeze.isdigit():
        freeze = int(freeze)
    if not (freeze in ("none", "backbone") or (isinstance(freeze, int) and freeze >= 0)):
        problems.append(f"model.freeze: expected 'none', 'backbone' or a number of blocks >= 0, got {freeze!r}")
    problems += range_problems("model", {
        "mixup_alpha": (NonNegativeFloat, mixup_alpha), "cutmix_alpha": (NonNegativeFloat, cutmix_alpha),
        "mix_prob": (ClosedUnitInterval, mix_prob), "switch_prob": (ClosedUnitInterval, switch_prob),
        "ema_decay": (OpenUnitInterval, ema_decay)})
    if problems:
        raise ValueError("invalid fine-tuning configuration:\n  " + "\n  ".join(problems))
