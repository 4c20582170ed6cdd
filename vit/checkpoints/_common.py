"""Pieces shared by the format modules: our error type, template key renaming, normalisation constants."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: F401  (re-exported)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: F401

HALF = (0.5, 0.5, 0.5)  # Google ViT / AugReg / big_vision, Hugging Face ViT


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys.

    ``missing``, ``unexpected`` and ``mismatched`` (key -> (checkpoint shape, model shape)) hold the
    details when the problem is a key mismatch, so callers can act on them without parsing text.
    """

    def __init__(self, message: str, *, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None):
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or {}


def _template_regex(template: str) -> re.Pattern:
    # "{i}" stands for a block index; everything else is literal and matched as a key prefix.
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def rename(state_dict: Mapping[str, torch.Tensor], rules: list[tuple[str, str]],
           reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename keys by prefix templates, e.g. ``("encoder.layers.encoder_layer_{i}.ln_1.", "blocks.{i}.norm1.")``.

    The first matching rule wins; keys that match no rule pass through unchanged (so the final key check
    reports them as unexpected). ``reverse=True`` maps the right-hand side back to the left.

    Example:
        >>> rename({"a.3.w": torch.zeros(1)}, [("a.{i}.", "b.{i}.")]).keys()
        dict_keys(['b.3.w'])
    """
    compiled = [(_template_regex(dst if reverse else src), src if reverse else dst) for src, dst in rules]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, target in compiled:
            match = pattern.match(key)
            if match:
                prefix = target.replace("{i}", match.groupdict().get("i") or "")
                key = prefix + key[match.end():]
                break
        out[key] = value
    return out


def block_indices(keys, pattern: str) -> list[int]:
    """Sorted block indices found in keys by a regex with one group, e.g. ``r"^blocks\\.(\\d+)\\."``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})
