"""What every task module does the same way.

``TaskCheckpoints``: read checkpoints with ``weights_only=True``, record the classes they were trained on and refuse
other data's, and store the loaded architecture in place of a pretrained source (so ``load_from_checkpoint(path)``
works where the pretrained file is not). ``TrainingFeatures``: the learning-rate schedule (``schedule: epochs |
budget``), EMA weights for validation and test (``ema_decay``) and what a NaN/inf loss does (``nonfinite_loss``).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..models.vision import VisionTransformer
from ..training.optim import TimeBudgetCosine, epoch_warmup_cosine, scaled_param_groups
from ..utils.ranges import OpenUnitInterval, range_problems
from .backbone import OVERRIDE_FIELDS

SCHEDULES = ("epochs", "budget")
NONFINITE_LOSS = ("error", "skip")


class ClassMismatchError(ValueError):
    """A checkpoint's class names differ from the data's (both lists in the message)."""


class TaskCheckpoints:
    """A mixin for task LightningModules (listed before ``LightningModule``) that have ``class_names`` and a
    ``hparams["backbone"]``; a task adds its own keys by extending the two hooks and calling ``super()``."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs):
        """Lightning's ``load_from_checkpoint``, reading with ``weights_only=True`` unless told otherwise: our
        checkpoints hold tensors and plain values only, and this way a checkpoint carrying pickled code is refused
        even where torch's own default has been switched off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)."""
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    def checkpoint_backbone(self) -> VisionTransformer:
        """The ViT whose architecture a checkpoint records."""
        raise NotImplementedError

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint is read against the data's classes: a different list or order would mislabel everything.
        saved = checkpoint.get("class_names")
        check_class_names(saved, self.class_names)
        if saved is not None and self.class_names is None:
            self.class_names = list(saved)
        super().on_load_checkpoint(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["class_names"] = self.class_names
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and (hparams.get("backbone") or {}).get("pretrained"):
            arch = self.checkpoint_backbone().config.to_dict()
            hparams["backbone"] = {**hparams["backbone"], "pretrained": None, "arch": None,
                                   **{k: arch[k] for k in OVERRIDE_FIELDS}}


def check_class_names(saved: Sequence[str] | None, current: Sequence[str] | None) -> None:
    """``ClassMismatchError`` naming both lists when a checkpoint's classes are not the data's (same order).

    Example:
        >>> check_class_names(["cat", "dog"], ["cat", "dog"])
        >>> check_class_names(["cat", "dog"], ["dog", "cat"])
        Traceback (most recent call last):
        ...
        vit.tasks.common.ClassMismatchError: the checkpoint's classes differ from the data's:
          checkpoint (2): ['cat', 'dog']
          data       (2): ['dog', 'cat']
    """
    if saved is not None and current is not None and list(saved) != list(current):
        raise ClassMismatchError(f"the checkpoint's classes differ from the data's:\n  checkpoint ({len(saved)}): "
                                 f"{list(saved)}\n  data       ({len(current)}): {list(current)}")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (the message names the step and learning rate)."""


class TrainingFeatures:
    """A mixin for task LightningModules (listed before ``LightningModule``) whose hyper-parameters hold ``lr``,
    ``warmup_epochs``, ``min_lr_ratio``, ``schedule``, ``ema_decay`` and ``nonfinite_loss``:

    - ``lr_scheduler_config(optimizer)``: warm-up + cosine over ``trainer.max_epochs`` (``schedule: epochs``) or
      over the time ``trainer.max_time`` allows, less room for the last validation (``schedule: budget``);
    - ``configure_callbacks``: Lightning's ``EMAWeightAveraging`` while fitting when ``ema_decay`` is set (validation,
      test and checkpoints then use the averaged weights; the raw ones are kept for resuming);
    - ``nonfinite(loss, batch_idx)``: ``nonfinite_loss: error`` raises ``NonFiniteLossError`` naming the step and
      learning rate, ``skip`` returns None so Lightning skips the batch, counted in ``nonfinite_skipped`` (kept in
      checkpoints).
    """

    nonfinite_skipped = 0  # batches skipped for a NaN/inf loss (nonfinite_loss: skip)
    _validation_seconds = 0.0  # the last validation's duration (schedule: budget keeps room for it)

    def configure_optimizers(self):
        """AdamW over ``scaled_param_groups`` (layer decay, no weight decay on embeddings, norms and biases) with
        ``lr_scheduler_config``'s schedule."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(scaled_param_groups(self, hp.lr, hp.weight_decay, self.backbone.layer_decay),
                                      lr=hp.lr)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}

    def lr_scheduler_config(self, optimizer) -> dict[str, Any]:
        """The ``lr_scheduler`` entry of ``configure_optimizers``: stepped every optimizer step."""
        hp = self.hparams
        if hp.schedule == "budget":
            scheduler = self._budget_schedule(optimizer)
        else:
            scheduler = epoch_warmup_cosine(optimizer, self.trainer, hp.warmup_epochs, hp.min_lr_ratio)
        return {"scheduler": scheduler, "interval": "step"}

    def _budget_schedule(self, optimizer):
        from lightning.pytorch.callbacks import Timer
        from torch.optim.lr_scheduler import LambdaLR
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

    def on_validation_start(self) -> None:
        self._validation_started = time.perf_counter()
        super().on_validation_start()

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validation_seconds = time.perf_counter() - self._validation_started
        super().on_validation_end()

    def configure_callbacks(self):
        stage = getattr(self.trainer.state.fn, "value", self.trainer.state.fn)  # TrainerFn -> 'fit'
        # one the trainer already has (configured in a recipe) wins over ours
        if stage != "fit" or not self.hparams.ema_decay or any(isinstance(c, EMAWeightAveraging)
                                                                for c in self.trainer.callbacks):
            return []
        return [EvaluatedEMA(decay=self.hparams.ema_decay)]

    def nonfinite(self, loss: torch.Tensor, batch_idx: int, terms: dict[str, torch.Tensor] | None = None) -> None:
        """Raise or skip for a NaN/inf training loss (``terms``: its parts, named in the message); return its
        result from ``training_step``."""
        step, optimizers = self.global_step, self.trainer.optimizers
        lrs = sorted({g["lr"] for g in optimizers[0].param_groups}) if optimizers else [self.hparams.lr]
        lr = f"{lrs[0]:.3g}" if len(lrs) == 1 else f"{lrs[0]:.3g}..{lrs[-1]:.3g}"
        where = f"at step {step} (epoch {self.current_epoch}, batch {batch_idx}), learning rate {lr}"
        value = f"{loss.item()}" + (f" = {({k: float(v) for k, v in terms.items()})}" if terms else "")
        if self.hparams.nonfinite_loss == "error":
            raise NonFiniteLossError(f"non-finite training loss ({value}) {where}. Lower model.lr, raise "
                                     f"model.warmup_epochs, use precision 32-true or bf16-mixed, or set "
                                     f"model.nonfinite_loss: skip to skip such batches")
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        if self.nonfinite_skipped == 1:
            warnings.warn(f"skipping a batch with a non-finite loss {where}; further ones are counted in "
                          f"train/nonfinite_skipped", stacklevel=2)
        return None  # Lightning skips backward and the optimizer step for this batch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped


def training_feature_problems(*, schedule: str, ema_decay: float | None, nonfinite_loss: str) -> list[str]:
    """``TrainingFeatures``' settings that are impossible, each naming its ``model.`` key."""
    problems = range_problems("model", {"ema_decay": (OpenUnitInterval, ema_decay)})
    if schedule not in SCHEDULES:
        problems.append(f"model.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if nonfinite_loss not in NONFINITE_LOSS:
        problems.append(f"model.nonfinite_loss: expected 'error' or 'skip', got {nonfinite_loss!r}")
    return problems


class EvaluatedEMA(EMAWeightAveraging):
    """Lightning's EMA weights, except that a checkpoint loaded after fitting to test, validate or predict (``fit``
    then ``test(ckpt_path="best")`` in one process, as ``python train.py`` does) keeps the averaged weights its
    ``state_dict`` holds, the ones validation chose it by; Lightning's own callback puts the raw training weights
    back there, so the test would score other weights than a later ``train.py test --ckpt_path`` does."""

    def __init__(self, decay: float = 0.999, **kwargs: Any):
        super().__init__(decay=decay, **kwargs)
        # the same average, one foreach kernel per dtype instead of a Python loop over tensors (1.7 -> 0.6 ms a
        # step for the default recipe's model)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if getattr(trainer.state.fn, "value", trainer.state.fn) == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
