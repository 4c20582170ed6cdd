"""ImageTextModule: the LightningModule that trains (or fine-tunes) an ``ImageTextModel`` on image-caption pairs with
the CLIP (softmax) or SigLIP (sigmoid) loss, negatives gathered from every process (``vit.tasks.contrastive``)."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional

import lightning as L
import torch

from ..checkpoints.image_text import load_image_text
from ..checkpoints.tokenizer import OpenCLIPTokenizer, load_tokenizer
from ..models.config import ViTConfig
from ..models.image_text import ImageTextModel, image_text_config
from ..models.text import TextConfig, TextTransformer
from ..training.optim import epoch_warmup_cosine, scaled_param_groups
from ..utils.ranges import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, plain, range_problems
from .backbone import Backbone, freeze_layers
from .common import TaskCheckpoints
from .contrastive import LOSSES, contrastive_loss

# open_clip clamps the learned temperature at 100 (log 100 = 4.6052) so the logits cannot run away
MAX_LOGIT_SCALE = math.log(100)
_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(TextConfig) if f.name != "proj_dim")

_TextTower = dataclasses.make_dataclass("_TextTower", [
    ("tokenizer", Optional[str], dataclasses.field(default=None)),
    ("freeze", bool, dataclasses.field(default=False)),
    *[(name, Optional[typing.get_type_hints(TextConfig)[name]], dataclasses.field(default=None))
      for name in _TEXT_FIELDS]], frozen=True)


def _text_field_docs() -> str:
    """``TextConfig``'s ``Args:`` entries for the fields a text tower overrides (all but ``proj_dim``)."""
    args = (TextConfig.__doc__ or "").split("Args:")[1].split("Example:")[0]
    entries = re.split(r"\n(?=        \w+:)", args.strip("\n"))
    return "\n".join(e.rstrip() for e in entries if e.strip().split(":")[0] in _TEXT_FIELDS)


@dataclasses.dataclass(frozen=True)
class TextTower(_TextTower):
    __doc__ = """The text tower an image-text task builds (``model.text`` in a recipe), beside ``model.backbone`` for
    the image tower: a tokenizer, whether it trains, and overrides of any ``TextConfig`` field but ``proj_dim`` (the
    joint width is ``model.joint_dim``). ``None`` = ``TextConfig``'s default, or a pretrained model's own.

    Args:
        tokenizer: anything ``vit.checkpoints.tokenizer.load_tokenizer`` reads (``"openclip"``: the BPE vocabulary
            inside open_clip_torch, 49,408 ids; a ``tokenizer.json``, ``vocab.json`` or ``spiece.model`` file or
            their folder); None = a pretrained model's own, else ``"openclip"``.
        freeze: keep the text tower's weights fixed (train the image side only).
""" + _text_field_docs() + """

    Example:
        >>> TextTower(embed_dim=64, depth=2).config(joint_dim=32).proj_dim
        32
    """

    def overrides(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _TEXT_FIELDS if getattr(self, name) is not None}

    def config(self, joint_dim: int) -> TextConfig:
        return TextConfig(proj_dim=joint_dim).replace(**self.overrides())

    def as_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name))[0] for f in dataclasses.fields(self)}

    @classmethod
    def from_value(cls, value: "TextTower | Mapping[str, Any] | None") -> "TextTower":
        if value is None or isinstance(value, cls):
            return value or cls()
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise TypeError(f"unknown text tower field(s): {', '.join(unknown)}; known: tokenizer, freeze, "
                                f"{', '.join(_TEXT_FIELDS)}")
            return cls(**value)
        raise TypeError(f"text: expected a TextTower or a mapping of its fields, got {type(value).__name__}")


class ImageTextModule(TaskCheckpoints, L.LightningModule):
    """Contrastive image-text training: CLIP's symmetric cross-entropy over the batch (``loss: clip``) or SigLIP's
    sigmoid loss on every pair (``loss: siglip``, with ``logit_bias``), over the batch of every process under DDP;
    AdamW (layer-wise LR decay on the image tower, no weight decay on embeddings, norms, biases and the temperature),
    warm-up + cosine. ``val/acc``: how often an image's nearest caption, among the distinct validation captions, is
    its own (for class data captioned with one template: the zero-shot accuracy).

    Start from a whole CLIP / SigLIP model (``pretrained_model``), or build both towers: the image tower from ``backbone``
    (its head becomes the image projection to ``joint_dim``), the text tower from ``text``.

    Args:
        backbone: the image tower (``arch``, ``pretrained`` image weights, ``freeze``, ``layer_decay``,
            ``grad_checkpointing``, ViTConfig overrides); see ``vit.tasks.backbone.Backbone``.
        text: the text tower (tokenizer, ``freeze``, TextConfig overrides); see ``TextTower``.
        pretrained_model: a whole image-text model: anything ``vit.load_image_text`` reads (its image size is kept).
        joint_dim: width of the joint image-text space when the towers are built here.
        loss: "clip" (softmax) or "siglip" (sigmoid; the model gets a ``logit_bias`` if it has none).
        init_logit_scale: log of the starting temperature; None = log(1 / 0.07) for CLIP, log(10) for SigLIP (a
            pretrained model keeps its own).
        init_logit_bias: SigLIP's starting bias; None = -10 (the paper's).
        lr: peak AdamW learning rate (scaled per image layer by backbone.layer_decay).
        weight_decay: AdamW weight decay (not on embeddings, norms, biases, logit_scale, logit_bias).
        betas: AdamW's (beta1, beta2); CLIP used (0.9, 0.98).
        warmup_epochs: epochs of linear warm-up (fractions allowed; at most half of training).
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of lr.
        class_names: recorded in checkpoints (optional).
        architecture: written into checkpoints in place of ``pretrained_model``: both towers' configs and the tokenizer,
            so ``load_from_checkpoint`` and ``vit.load_image_text`` rebuild the model without the original files.

    Example:
        >>> module = ImageTextModule(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        ...                          TextTower(context_length=16, embed_dim=32, depth=1, num_heads=2), joint_dim=16)
        >>> module.model.tokenize(["a photo of the digit seven."]).shape
        torch.Size([1, 16])
    """

    def __init__(self, backbone: Backbone = Backbone(), text: TextTower = TextTower(), pretrained_model: str | None = None,
                 joint_dim: PositiveInt = 512, loss: Literal["clip", "siglip"] = "clip",
                 init_logit_scale: float | None = None, init_logit_bias: float | None = None,
                 lr: PositiveFloat = 5e-4, weight_decay: NonNegativeFloat = 0.2,
                 betas: tuple[float, float] = (0.9, 0.98), warmup_epochs: NonNegativeFloat = 1.0,
                 min_lr_ratio: Fraction = 0.0, class_names: list[str] | None = None,
                 architecture: dict[str, Any] | None = None):
        super().__init__()
        joint_dim, lr, weight_decay, warmup_epochs, min_lr_ratio = plain(joint_dim, lr, weight_decay, warmup_epochs,
                                                                         min_lr_ratio)
        self.backbone, self.text = Backbone.from_value(backbone), TextTower.from_value(text)
        backbone, text = self.backbone.as_dict(), self.text.as_dict()  # plain values (weights_only checkpoints)
        self.save_hyperparameters()
        problems = range_problems("model", {"joint_dim": (PositiveInt, joint_dim), "lr": (PositiveFloat, lr),
                                            "weight_decay": (NonNegativeFloat, weight_decay),
                                            "warmup_epochs": (NonNegativeFloat, warmup_epochs),
                                            "min_lr_ratio": (Fraction, min_lr_ratio)})
        if loss not in LOSSES:
            problems.append(f"model.loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        if problems:
            raise ValueError("invalid image-text configuration:\n  " + "\n  ".join(problems))
        self.class_names = list(class_names) if class_names is not None else None
        # Built (and pretrained weights read) here: a resumed .ckpt is restored after __init__ and must win.
        self.model = self._build(architecture, pretrained_model, joint_dim, loss, init_logit_scale, init_logit_bias)
        freeze_layers(self.model.visual, self.backbone.freeze)
        self.model.visual.set_grad_checkpointing(self.backbone.grad_checkpointing)
        self.model.text.requires_grad_(not self.text.freeze)
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _build(self, architecture, pretrained, joint_dim, loss, init_logit_scale, init_logit_bias) -> ImageTextModel:
        siglip = loss == "siglip"
        bias = (-10.0 if init_logit_bias is None else init_logit_bias) if siglip else init_logit_bias
        if architecture is not None:
            model = ImageTextModel(ViTConfig.from_dict(architecture["vision"]),
                                   TextConfig.from_dict(architecture["text"]),
                                   init_logit_bias=0.0 if architecture["logit_bias"] else None)
            model.tokenizer = _tokenizer(architecture.get("tokenizer"), model.text.context_length)
            return model
        if pretrained:
            model = load_image_text(pretrained, text=self.text.overrides() or None,
                                    tokenizer=self.text.tokenizer)
            for key in ("img_size", "in_chans"):  # the CLI links them from the data
                wanted, have = getattr(self.backbone, key), getattr(model.visual.config, key)
                if wanted is not None and wanted != have:
                    raise ValueError(f"model.pretrained_model {pretrained} takes {key} {have}, but the recipe asks "
                                     f"for {wanted} (set data.{key}: {have})")
            if siglip and model.logit_bias is None:
                model.logit_bias = torch.nn.Parameter(torch.tensor(float(bias)))
            return model
        visual = self.backbone.build(num_classes=joint_dim)  # the head is the image projection
        text = TextTransformer(self.text.config(joint_dim))
        scale = init_logit_scale if init_logit_scale is not None else math.log(10 if siglip else 1 / 0.07)
        return ImageTextModel(visual, text, init_logit_scale=scale, init_logit_bias=bias,
                              tokenizer=_tokenizer(self.text.tokenizer or "openclip", text.context_length))

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor):
        """(normalised image features, normalised text features, ``logit_scale.exp()``), as the model's."""
        return self.model(images, token_ids)

    # ---- steps -----------------------------------------------------------------------------------------------
    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, image features, text features, temperature, token ids); captions given as strings are tokenised
        with the model's own tokenizer."""
        images, captions = batch
        token_ids = captions if isinstance(captions, torch.Tensor) else \
            self.model.tokenize(list(captions)).to(images.device)
        image_features, text_features, scale = self(images, token_ids)
        loss = contrastive_loss(image_features, text_features, scale, self.model.logit_bias, self.hparams.loss)
        return loss, image_features, text_features, scale, token_ids

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _, scale, _ = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite contrastive loss ({loss.item()}) at step {self.global_step}; "
                                     f"lower model.lr or raise model.warmup_epochs")
        batch_size = len(batch[0])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", scale.detach(), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch, split: str) -> None:
        loss, image_features, text_features, _, token_ids = self._loss(batch)
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=len(batch[0]))
        self._outputs.append((image_features, text_features, token_ids))

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def _log_accuracy(self, split: str) -> None:
        if not self._outputs:
            return
        parts = [torch.cat(p) for p in zip(*self._outputs)]
        self._outputs = []
        if self.trainer.world_size > 1:  # every process scores the whole split (each process's part is equal)
            parts = [self.all_gather(p).flatten(0, 1) for p in parts]
        self.log(f"{split}/acc", caption_accuracy(*parts), prog_bar=split == "val")

    # ---- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = scaled_param_groups(self.model.visual, hp.lr, hp.weight_decay, self.backbone.layer_decay)
        groups += scaled_param_groups(self.model.text, hp.lr, hp.weight_decay)
        temperature = [p for p in (self.model.logit_scale, self.model.logit_bias) if p is not None and p.requires_grad]
        groups.append({"params": temperature, "lr": hp.lr, "weight_decay": 0.0})
        fused = next(self.parameters()).device.type in ("cpu", "cuda") and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas),
                                      fused=fused)
        schedule = epoch_warmup_cosine(optimizer, self.trainer, hp.warmup_epochs, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_backbone(self):
        return self.model.visual

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:  # the architecture, not the files it came from (vit.load_image_text reads it)
            hparams["architecture"] = {**image_text_config(self.model),
                                       "tokenizer": tokenizer_spec(self.model.tokenizer)}
            hparams["pretrained_model"] = None


def caption_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, token_ids: torch.Tensor) -> float:
    """How often an image's most similar caption, among the distinct captions (by token ids), is its own.

    Example:
        >>> features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> caption_accuracy(features, features, torch.tensor([[1], [2], [2]]))  # images 1 and 2 share a caption
        1.0
    """
    distinct, owner = torch.unique(token_ids, dim=0, return_inverse=True)
    positions = torch.arange(len(token_ids), device=token_ids.device)
    first = torch.full((len(distinct),), len(token_ids), device=token_ids.device).scatter_reduce(
        0, owner, positions, reduce="amin")  # the features of each distinct caption: its first occurrence's
    predicted = (image_features @ text_features[first].T).argmax(dim=1)
    return float((predicted == owner).float().mean())


def tokenizer_spec(tokenizer) -> str | None:
    """What ``load_tokenizer`` needs to rebuild a tokenizer: ``"openclip"`` or its file; None for a callable."""
    if isinstance(tokenizer, OpenCLIPTokenizer):
        return "openclip"
    return getattr(tokenizer, "name", None) if tokenizer is not None else None


def _tokenizer(spec: str | None, context_length: int):
    return load_tokenizer(spec, context_length) if spec else None
