"""Backbones for frozen-feature work: where they come from, how they see images, how their tokens are pooled."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoints import load_pretrained
from ..models.vision import VisionTransformer
from .features import POOLS

RANDOM = "random:"  # random:SRC = SRC's architecture and preprocessing, fresh (seeded) random weights
RANDOM_SEED = 0


def is_registered(name: str) -> bool:
    """Whether ``name`` (optionally ``name.tag``) is a registered architecture rather than a path."""
    from ..models.registry import list_models
    return not Path(name).expanduser().exists() and name.partition(".")[0] in list_models()


def load_backbone(source: str | os.PathLike, img_size: int | Sequence[int] | None = None,
                  image_text: bool = False) -> VisionTransformer:
    """A backbone in eval mode from anything ``vit.load_pretrained`` reads, a registered name (its pretrained
    weights, as ``vit.create_model(name, pretrained=True)``) or ``random:SRC`` (SRC's architecture and
    preprocessing with seeded random weights: the baseline a backbone has to beat). ``img_size`` resamples the
    position embeddings to another input size; by default the backbone's own size is kept. ``image_text=True``: the
    image tower of a whole CLIP / SigLIP model (``vit.load_image_text``; a source without a text tower is refused),
    whose output is the joint image-text space.

    Example:
        >>> load_backbone("random:vit_tiny_patch16_224", img_size=32).img_size
        (32, 32)
    """
    source = str(source)
    adapt = {"img_size": img_size} if img_size is not None else {}
    if image_text:
        from ..checkpoints.image_text import load_image_text
        return at_image_size(load_image_text(source).visual.eval(), img_size)
    if source.startswith(RANDOM):
        inner = source[len(RANDOM):]
        if is_registered(inner):
            from ..checkpoints.factory import create_model
            template = create_model(inner.partition(".")[0], **adapt)
        else:
            template = load_pretrained(inner, **adapt)
        torch.manual_seed(RANDOM_SEED)
        model = VisionTransformer(template.config)
        model.pretrained_cfg = {**(getattr(template, "pretrained_cfg", None) or {}), "source": source}
        return model.eval()
    if is_registered(source):
        from ..checkpoints.factory import create_model
        return create_model(source, pretrained=True, **adapt).eval()
    return load_pretrained(source, **adapt).eval()


def at_image_size(model: VisionTransformer, img_size: int | Sequence[int] | None) -> VisionTransformer:
    """``model`` itself at its own size, else a copy with position embeddings resampled to ``img_size``."""
    if img_size is None:
        return model
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if size == tuple(model.img_size):
        return model
    resized = load_pretrained(model.state_dict(), model=model, img_size=size)
    resized.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "img_size": list(size)}
    return resized.to(model.pos_embed.device).eval()


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every weight: two models with one fingerprint give the same features (wherever they live).

    Example:
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        >>> len(fingerprint(m)), fingerprint(m) == fingerprint(m)
        (16, True)
    """
    import hashlib
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def source_identity(source: str) -> dict[str, Any]:
    """What a backbone's features depend on, for cache keys: the source string and, for local files, each file's
    (path, modification time, size), so a checkpoint overwritten by a new run is not mistaken for the old one."""
    inner = source[len(RANDOM):] if source.startswith(RANDOM) else source
    path = Path(inner).expanduser()
    files: list = []
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = [[str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size] for p in files]
    return {"source": source, "files": stats, "random_seed": RANDOM_SEED if inner != source else None}


def preprocessing(model: VisionTransformer, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  crop_pct: float | None = None) -> dict[str, Any]:
    """How ``model`` wants its images: ``img_size``, ``mean``, ``std``, ``crop_pct`` (from its ``pretrained_cfg``;
    ImageNet's mean/std and no crop when it says nothing), each overridden when given.

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        >>> preprocessing(m, mean=[0.5], std=[0.5])  # a model built here says nothing: ImageNet's, no crop
        {'img_size': [32, 32], 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5], 'crop_pct': 1.0}
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ..data.transforms import match_channels
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean") or IMAGENET_DEFAULT_MEAN
    std = std if std is not None else cfg.get("std") or IMAGENET_DEFAULT_STD
    return {"img_size": list(model.img_size), "mean": list(match_channels(mean, model.in_chans)),
            "std": list(match_channels(std, model.in_chans)),
            "crop_pct": float(crop_pct if crop_pct is not None else cfg.get("crop_pct") or 1.0)}


def check_pool(model: VisionTransformer, pool: str) -> None:
    """``ValueError`` naming the option when ``pool`` is unknown or the model cannot do it."""
    if pool not in POOLS:
        raise ValueError(f"--pool: expected one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "proj" and (getattr(model, "pretrained_cfg", None) or {}).get("text_format") is None:
        raise ValueError("--pool proj: the joint image-text space needs a CLIP / SigLIP checkpoint with its text tower "
                         "(loaded with vit.load_image_text)")
    if pool == "map" and model.attn_pool is None:
        raise ValueError(f"--pool map: the backbone has no attention pool (its global_pool is "
                         f"{model.global_pool!r}); use cls or avg")


def pool_tokens(model: VisionTransformer, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Tokens from ``forward_features`` (B, prefix + N, D) -> embeddings: ``cls`` the class token (the model's own
    pooling when it has none), ``avg`` the mean of the patch tokens, ``map`` the attention pool, each through the
    model's ``fc_norm`` as its own head would be (B, D); ``tokens`` every patch token (B, N, D). Register and
    distillation tokens never enter.

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=2)
        >>> tokens = m.forward_features(torch.zeros(1, 3, 32, 32))
        >>> [tuple(pool_tokens(m, tokens, p).shape) for p in ("cls", "avg", "tokens")]
        [(1, 32), (1, 32), (1, 16, 32)]
    """
    if pool == "proj":  # the tower's own pooling and head: CLIP's projection, SigLIP's attention pool
        return model.forward_head(tokens)
    patches = tokens[:, model.num_prefix_tokens:]
    if pool == "tokens":
        return patches
    if pool == "avg":
        return model.fc_norm(patches.mean(dim=1))
    if pool == "map":
        return model.fc_norm(model.attn_pool(patches))
    if model.cls_token is None:
        return model.forward_head(tokens, pre_logits=True)
    return model.fc_norm(tokens[:, 0])


@dataclass(frozen=True)
class EmbedderConfig:
    """What an ``Embedder`` computes: the backbone's architecture and the pooling. Its repr is part of the export
    cache key (``vit.deploy.common.weights_key``), so an embedder never shares an ONNX / OpenVINO file with the
    classifier of the same weights, nor with an embedder of another pool."""
    backbone: Any
    pool: str


class Embedder(nn.Module):
    """A backbone and a pooling as one module, ``images (B, C, H, W) -> embeddings`` (``pool_tokens`` of
    ``forward_features``), so ``vit.deploy.runners.create_runner(Embedder(model, pool), compare="cosine")`` runs
    feature extraction on any backend. Exposes ``img_size``, ``in_chans`` and ``config`` (backbone config + pool).

    Example:
        >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> embedder = Embedder(m, "avg")
        >>> embedder(torch.zeros(2, 3, 16, 16)).shape, embedder.config.pool
        (torch.Size([2, 32]), 'avg')
    """

    def __init__(self, model: VisionTransformer, pool: str = "cls", *, image_tower: bool = False):
        super().__init__()
        if not (image_tower and pool == "proj"):  # the caller holds the whole image-text model (zeroshot)
            check_pool(model, pool)
        self.model, self.pool = model, pool
        self.img_size, self.in_chans = tuple(model.img_size), model.in_chans
        self.config = EmbedderConfig(getattr(model, "config", type(model).__name__), pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # named x: the ONNX exporter's dynamic batch is keyed by it
        return pool_tokens(self.model, self.model.forward_features(x), self.pool)
