"""Backbone: the one description of the ViT every task module builds on (``model.backbone`` in a recipe).

An architecture name, overrides of any ``ViTConfig`` field, a pretrained source, what to freeze and the
layer-wise LR decay. The override fields are made from ``ViTConfig`` itself, so a new architecture option is a
new ``ViTConfig`` field and every task (and the CLI's ``--model.backbone.<field>``) sees it with no edit here.

    model:
      backbone:
        arch: vit_small_patch16_224     # or pretrained: hf-hub:timm/..., and/or any ViTConfig field
        embed_dim: 128
        freeze: none
        layer_decay: 0.65
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

from ..checkpoints import load_pretrained
from ..models.config import ACT_LAYERS, ATTN_LAYERS, EMBED_LAYERS, GLOBAL_POOLS, MLP_LAYERS, ViTConfig
from ..models.registry import model_config
from ..models.vision import VisionTransformer
from ..utils.ranges import DecayFactor, plain, range_problems

# ViTConfig fields a task does not take from its backbone description: the head's size is the task's
# (classes, or none for detection / segmentation), and DeiT distillation needs a teacher no task trains with.
TASK_FIELDS = ("num_classes", "distilled")
# Choices the CLI checks while parsing (ViTConfig checks them too, but only once the model is built).
_CHOICES = {"global_pool": GLOBAL_POOLS, "act_layer": ACT_LAYERS, "mlp_layer": MLP_LAYERS,
            "embed_layer": EMBED_LAYERS, "attn_layer": ATTN_LAYERS}


def _override_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(ViTConfig)
    fields = []
    for field in dataclasses.fields(ViTConfig):
        if field.name in TASK_FIELDS:
            continue
        kind = Literal[_CHOICES[field.name]] if field.name in _CHOICES else hints[field.name]
        fields.append((field.name, Optional[kind], dataclasses.field(default=None)))
    return fields


def _override_docs() -> str:
    """The ``Args:`` lines of ViTConfig's docstring for the fields a backbone overrides."""
    lines, keep = [], False
    for line in (ViTConfig.__doc__ or "").split("Args:")[1].split("Example:")[0].splitlines():
        if line.startswith("        ") and not line.startswith("         "):
            keep = line.strip().split(":")[0] not in TASK_FIELDS
        if keep and line.strip():
            lines.append(line)
    return "\n".join(lines)


OVERRIDE_FIELDS = tuple(name for name, _, _ in _override_fields())

_Backbone = dataclasses.make_dataclass("_Backbone", [
    ("arch", Optional[str], dataclasses.field(default=None)),
    ("pretrained", Optional[str], dataclasses.field(default=None)),
    ("freeze", Union[int, Literal["none", "backbone"]], dataclasses.field(default="none")),
    ("layer_decay", Optional[DecayFactor], dataclasses.field(default=None)),
    ("grad_checkpointing", bool, dataclasses.field(default=False)),
    *_override_fields()], frozen=True)


@dataclasses.dataclass(frozen=True)
class Backbone(_Backbone):
    __doc__ = """The ViT a task builds on: where it comes from, how it differs from that, what trains.

    Every ``ViTConfig`` field but ``num_classes`` and ``distilled`` is an override here (``None`` = the
    architecture's, or the checkpoint's); ``num_classes`` is the task's.

    Args:
        arch: registered architecture to start from (``vit.list_models()``); None = ``ViTConfig``'s defaults.
        pretrained: weights to start from: anything ``vit.load_pretrained`` reads (a file, a directory,
            ``hf-hub:ORG/REPO``, ``timm:model.tag``). Position embeddings are resampled to ``img_size``; the
            other architecture fields are hints for a bare state dict; dropout rates apply as given.
        freeze: ``"none"``, ``"backbone"`` (train the task's head only: a linear probe) or N (freeze the
            embeddings and the first N blocks).
        layer_decay: layer-wise LR decay: the head gets the full LR, each layer below it this factor more;
            None = off.
        grad_checkpointing: recompute block activations in backward: less memory, about a third more compute.
""" + _override_docs() + """

    Example:
        >>> backbone = Backbone(arch="vit_tiny_patch16_224", img_size=32, depth=2)
        >>> model = backbone.build(num_classes=10)
        >>> model.embed_dim, len(model.blocks), model.num_classes
        (192, 2, 10)
        >>> Backbone.from_value({"embed_dim": 64, "depth": 2}).overrides()
        {'embed_dim': 64, 'depth': 2}
    """

    def __post_init__(self) -> None:
        freeze = int(self.freeze) if isinstance(self.freeze, str) and self.freeze.isdigit() else self.freeze
        object.__setattr__(self, "freeze", freeze)
        problems = range_problems("model.backbone", {"layer_decay": (DecayFactor, self.layer_decay)})
        if not (freeze in ("none", "backbone") or (isinstance(freeze, int) and not isinstance(freeze, bool)
                                                   and freeze >= 0)):
            problems.append(f"model.backbone.freeze: expected 'none', 'backbone' or a number of blocks >= 0, "
                            f"got {freeze!r}")
        if problems:
            raise ValueError("invalid backbone configuration:\n  " + "\n  ".join(problems))

    def overrides(self) -> dict[str, Any]:
        """The ``ViTConfig`` fields this description sets (the ones not ``None``)."""
        return {name: getattr(self, name) for name in OVERRIDE_FIELDS if getattr(self, name) is not None}

    def config(self, num_classes: int = 0) -> ViTConfig:
        """The architecture without weights: ``arch``'s config (or the defaults) with the overrides applied."""
        base = model_config(self.arch) if self.arch else ViTConfig()
        return base.replace(num_classes=num_classes, **self.overrides())

    def build(self, num_classes: int = 0) -> VisionTransformer:
        """The model, with a fresh head of ``num_classes`` outputs (0 = none): loaded from ``pretrained`` when
        given (read here, in the task's ``__init__``, so a resumed ``.ckpt`` loaded afterwards wins), else
        built from ``config``; gradient checkpointing and freezing applied."""
        if self.pretrained:
            given = self.overrides()
            hints = {k: v for k, v in given.items() if k not in ("img_size", "patch_size")}
            model = load_pretrained(self.pretrained, model=hints or None, num_classes=num_classes,
                                    img_size=given.get("img_size"), patch_size=given.get("patch_size"))
        else:
            model = VisionTransformer(self.config(num_classes))
        model.set_grad_checkpointing(self.grad_checkpointing)
        freeze_layers(model, self.freeze)
        return model

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (what checkpoints store: they are read with ``weights_only=True``)."""
        values = {f.name: plain(getattr(self, f.name))[0] for f in dataclasses.fields(self)}
        if isinstance(values.get("img_size"), tuple):
            values["img_size"] = list(values["img_size"])
        return values

    @classmethod
    def from_value(cls, value: "Backbone | Mapping[str, Any] | None") -> "Backbone":
        """A ``Backbone`` from itself, a mapping (a checkpoint's hyper-parameters) or None (the defaults); an
        unknown key is a ``TypeError`` that names it and the known ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise TypeError(f"unknown backbone field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            values = dict(value)
            if isinstance(values.get("img_size"), list):
                values["img_size"] = tuple(values["img_size"])
            return cls(**values)
        raise TypeError(f"backbone: expected a Backbone or a mapping of its fields, got {type(value).__name__}")


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
