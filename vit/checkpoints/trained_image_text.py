"""Checkpoints of our own ``ImageTextModule`` (``python train.py`` with ``task: image_text``): the Lightning
``.ckpt`` records both towers' configs, the temperature and the tokenizer in its hyper-parameters
(``architecture``), so ``vit.load_image_text`` rebuilds the model exactly, with the data's normalisation."""
from __future__ import annotations

import logging
from typing import Any, Callable

from ..models.config import ViTConfig
from ..models.image_text import ImageTextModel
from ..models.text import TextConfig
from ._common import CheckpointError
from ._read import RawCheckpoint
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)
PREFIX = "model."  # the LightningModule's attribute holding the ImageTextModel


def load_trained(raw: RawCheckpoint, tokenizer: Any = None, strict: bool = True) -> ImageTextModel:
    """The ``ImageTextModel`` of an ``ImageTextModule`` checkpoint (read by ``_read``), with its tokenizer (or the
    caller's: a callable or what ``load_tokenizer`` reads) and ``pretrained_cfg`` (the data's mean/std)."""
    arch = raw.meta["image_text"]
    try:
        model = ImageTextModel(ViTConfig.from_dict(arch["vision"]), TextConfig.from_dict(arch["text"]),
                               init_logit_bias=0.0 if arch.get("logit_bias") else None)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{raw.name}: the recorded image-text architecture is unreadable ({error})") from error
    state = {k[len(PREFIX):]: v for k, v in raw.state_dict.items() if k.startswith(PREFIX)}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(f"{raw.name}: the weights do not fit the architecture it records\n  "
                              + "\n  ".join([*(f"missing: {k}" for k in missing[:10]),
                                             *(f"unexpected: {k}" for k in unexpected[:10]), *wrong]),
                              missing=missing, unexpected=unexpected)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.tokenizer = _tokenizer(tokenizer if tokenizer is not None else arch.get("tokenizer"),
                                 model.text.context_length, raw.name)
    cfg = {"source": raw.name, "format": "vit_image_text", "file": raw.name, "num_classes": model.visual.num_classes,
           "class_names": None, "mean": _floats(raw.meta.get("mean")), "std": _floats(raw.meta.get("std")),
           "img_size": list(model.visual.img_size), "interpolation": "bicubic", "crop_pct": raw.meta.get("crop_pct")}
    model.visual.pretrained_cfg = cfg
    model.pretrained_cfg = {**cfg, "text_format": "vit_image_text"}
    return model


def _tokenizer(spec: Any, context_length: int, name: str) -> Callable | None:
    if spec is None or callable(spec):
        return spec
    try:
        return load_tokenizer(spec, context_length)
    except CheckpointError as error:
        log.warning("%s: its tokenizer (%s) cannot be read (%s); pass tokenizer= to load_image_text", name, spec,
                    error)
        return None


def _floats(values) -> list[float] | None:
    return [float(v) for v in values] if values is not None else None
