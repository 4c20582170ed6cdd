"""Feature files: embeddings with their image paths (and labels), as one ``.safetensors`` file.

Layout (readable with plain ``safetensors``, no ``vit`` needed):

- tensor ``features``: float32, ``(N, D)`` (pooled) or ``(N, T, D)`` (``pool="tokens"``: every patch token);
- tensor ``paths``: uint8, the N image paths in UTF-8 joined by NUL bytes (a byte a path cannot contain;
  a tensor rather than header metadata, so a million paths do not outgrow the header's size limit):
  ``bytes(f.get_tensor("paths").numpy()).decode().split("\\0")``;
- tensor ``labels``: int64 ``(N,)``, only when the images came with classes (a folder of class sub-folders);
- metadata (strings, each JSON-encoded): ``format`` (``"vit-features"``), ``version``, ``source`` (the backbone),
  ``pool``, ``img_size`` ([h, w]), ``mean``, ``std``, ``crop_pct``, ``class_names``, ``img_per_s``, ``skipped``
  ([path, reason] of each image left out).

Row ``i`` of every tensor is the same image; rows follow the input order, with unreadable images left out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

FORMAT = "vit-features"
VERSION = 1
POOLS = ("cls", "avg", "map", "tokens", "proj")  # proj: the image projection of a CLIP / SigLIP (joint space)


@dataclass
class Features:
    """Embeddings of images: ``features[i]`` belongs to ``paths[i]`` (and ``labels[i]``, if labelled).

    ``meta`` says how they were made (backbone ``source``, ``pool``, ``img_size``, ``mean``, ``std``, ``crop_pct``,
    ``img_per_s``); ``skipped`` lists the (path, reason) of images that could not be read.

    Example:
        >>> import tempfile
        >>> feats = Features(torch.eye(2), ["a.png", "b.png"], torch.tensor([0, 1]), ["cat", "dog"], {"pool": "cls"})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     back = Features.load(feats.save(f"{tmp}/f.safetensors"))
        >>> back.paths, back.labels.tolist(), back.class_names, back.meta["pool"], back.dim
        (['a.png', 'b.png'], [0, 1], ['cat', 'dog'], 'cls', 2)
    """

    features: torch.Tensor
    paths: list[str]
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.paths) or (self.labels is not None and len(self.labels) != len(self.paths)):
            raise ValueError(f"Features: {len(self.features)} feature rows, {len(self.paths)} paths and "
                             f"{'no' if self.labels is None else len(self.labels)} labels do not match")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        """The embedding size (the last dimension of ``features``)."""
        return int(self.features.shape[-1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file described in this module's docstring (to a temporary name, then renamed)."""
        from safetensors.torch import save_file

        from ..utils.files import atomic_path
        tensors = {"features": self.features.detach().float().cpu().contiguous(), "paths": encode_paths(self.paths)}
        if self.labels is not None:
            tensors["labels"] = self.labels.detach().long().cpu().contiguous()
        meta = {k: v for k, v in self.meta.items() if k not in ("format", "version", "class_names", "skipped")}
        metadata = {"format": FORMAT, "version": VERSION, "class_names": self.class_names, **meta,
                    "skipped": [list(item) for item in self.skipped]}
        path = Path(path)
        with atomic_path(path, durable=False) as part:
            save_file(tensors, str(part), metadata={k: json.dumps(v) for k, v in metadata.items()})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Features":
        """Read a file written by ``save`` (or ``vit embed``); anything else raises ``ValueError``
        naming the file."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such feature file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                if metadata.get("format") != FORMAT:
                    raise ValueError("no 'format': 'vit-features' in its metadata")
                keys = set(f.keys())
                if not {"features", "paths"} <= keys:
                    raise ValueError("the tensors 'features' and 'paths' are missing")
                features, paths = f.get_tensor("features"), decode_paths(f.get_tensor("paths"))
                labels = f.get_tensor("labels") if "labels" in keys else None
        except Exception as error:  # safetensors raises its own types on garbage
            raise ValueError(f"{path}: not a feature file written by vit embed ({error})") from None
        class_names, skipped = metadata.pop("class_names", None), metadata.pop("skipped", None) or []
        return cls(features, paths, labels, class_names, metadata, [tuple(item) for item in skipped])


def encode_paths(paths: Sequence[str]) -> torch.Tensor:
    """Paths -> one uint8 tensor (UTF-8, NUL-separated).

    Example:
        >>> decode_paths(encode_paths(["a b/ü.png", "c.jpg"]))
        ['a b/ü.png', 'c.jpg']
    """
    data = "\0".join(str(p) for p in paths).encode("utf-8", "surrogateescape")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def decode_paths(data: torch.Tensor) -> list[str]:
    text = bytes(data.numpy()).decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, dataset index) pieces (from batches or ranks) -> one block in index order, each index once.

    Example:
        >>> f, i = merge([(torch.tensor([[2.], [0.]]), torch.tensor([2, 0])),
        ...               (torch.tensor([[1.]]), torch.tensor([1]))])
        >>> f.flatten().tolist(), i.tolist()
        ([0.0, 1.0, 2.0], [0, 1, 2])
    """
    features = torch.cat([f for f, _ in parts]) if parts else torch.zeros(0)
    index = torch.cat([i for _, i in parts]).long() if parts else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(index, stable=True)
    index, features = index[order], features[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]  # keep one row per image, whatever a sampler repeated
    return features[first], index[first]
