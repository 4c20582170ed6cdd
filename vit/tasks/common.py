"""What every task module does the same way with its checkpoints: read them with ``weights_only=True``, record the
classes they were trained on and refuse other data's, and store the loaded architecture in place of a pretrained
source (so ``load_from_checkpoint(path)`` works where the pretrained file is not)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..models.vision import VisionTransformer
from .backbone import OVERRIDE_FIELDS


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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
