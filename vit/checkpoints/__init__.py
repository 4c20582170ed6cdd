"""Import and export of pretrained weights: timm, DeiT, torchvision, Hugging Face, Google ``.npz``, Lightning.

``load_pretrained`` = read safely (``_read``) -> detect the format from the keys (``SIGNATURES``) -> map to our
(timm) key layout (one module per source) -> infer the architecture -> adapt (position embeddings, patch
kernel, head) -> check every key and shape -> load. The model is touched only after the check passes, so a
failed load never leaves a half-loaded model.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import ViTConfig
from ..models.pos_embed import resample_patch_kernel, resample_pos_embed
from ..models.registry import model_config
from ..models.vision import VisionTransformer
from ..utils.files import atomic_path
from . import deit3, dinov2, hf, hf_clip, hf_dinov2, hf_siglip, npz, openclip, timm, torchvision
from ._arch import _grid, architecture_of, infer_architecture
from ._common import CheckpointError
from ._read import RawCheckpoint, read
from .image_text import export_image_text, image_text_hf_config, load_image_text, save_image_text

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "export_state_dict", "detect_format",
           "architecture_of", "SIGNATURES", "load_image_text", "export_image_text", "save_image_text",
           "image_text_hf_config"]

log = logging.getLogger(__name__)

# Detection order: dinov2 and deit3 files also have timm's signature key, so they come before timm.
# Hugging Face DINOv2 files also have hf's (ViT) signature key, so hf_dinov2 comes before hf.
FORMATS = {m.NAME: m for m in (dinov2, deit3, timm, torchvision, hf_dinov2, hf, hf_clip, hf_siglip, npz,
                                  openclip)}
# format -> the regex of one key only that format has. Checked after wrapper prefixes are allowed for.
SIGNATURES: dict[str, str] = {name: module.SIGNATURE for name, module in FORMATS.items()}
# What wraps a model's keys: DataParallel/DDP (module.), Lightning modules (model., net.), torch.compile.
_WRAPPERS = r"(?P<prefix>(?:module\.|model\.|net\.|_orig_mod\.)*)"
CONFIG_FORMAT = "vit"  # marks a config.json written by save_pretrained


# ---- detection ---------------------------------------------------------------------------------------------
def detect_format(state_dict: Mapping[str, Any]) -> tuple[str, str]:
    """(format, wrapper prefix) from the keys alone: the first signature that some key matches.

    Example:
        >>> detect_format({"model._orig_mod.patch_embed.proj.weight": None})
        ('timm', 'model._orig_mod.')
    """
    keys = list(state_dict)
    for name, signature in SIGNATURES.items():
        pattern = re.compile("^" + _WRAPPERS + signature + "$")
        for key in keys:
            match = pattern.match(key)
            if match:
                return name, match.group("prefix")
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    known = "; ".join(f"{n}: {s}" for n, s in SIGNATURES.items())
    raise CheckpointError(f"not a Vision Transformer checkpoint of a known format ({len(keys)} keys: {shown}). "
                          f"Looked for one of these keys: {known}")


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # Keys outside the prefix (a Lightning module's loss weights, an EMA copy) are not the model's.
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---- loading -------------------------------------------------------------------------------------------------
def _hints_and_meta(raw: RawCheckpoint, fmt: str, state_dict: Mapping[str, torch.Tensor]
                    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(format name to report, architecture hints, preprocessing/labels) from config files and defaults."""
    meta: dict[str, Any] = dict(FORMATS[fmt].DEFAULTS)
    hints: dict[str, Any] = {}
    config = raw.config or {}
    if config.get("format") == CONFIG_FORMAT:  # ours: the config is the exact architecture
        hints = dict(config.get("architecture") or {})
        meta.update({k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k not in ("format", "file")})
        return CONFIG_FORMAT, hints, meta
    if fmt == "hf":
        hints, extra = hf.read_config(config, raw.preprocessor)
        meta.update(extra)
    elif fmt in (hf_dinov2.NAME, hf_clip.NAME, hf_siglip.NAME):  # each family's own keys and defaults
        hints, extra = FORMATS[fmt].read_config(config, raw.preprocessor)
        meta.update(extra)
    elif fmt == "npz":
        hints = {"num_heads": npz.num_heads(raw.state_dict)}
    elif fmt == openclip.NAME and config:  # open_clip_config.json
        hints, extra = openclip.read_config(config)
        meta.update(extra)
    elif config:
        hints, extra = timm.read_config(config)
        meta.update(extra)
    if hasattr(FORMATS[fmt], "hints"):  # what a family's files imply but do not store (heads, QuickGELU)
        hints = {**FORMATS[fmt].hints(raw.state_dict), **hints}
    if fmt == "timm" and "dist_token" in state_dict and meta.get("mean") is None:
        meta.update(hf._DEIT_DEFAULTS)  # DeiT's distilled weights: ImageNet normalisation, bicubic
    hints.update(raw.meta.get("hints", {}))
    # a Lightning checkpoint's own class names / normalisation win
    meta.update({k: v for k, v in raw.meta.items() if k != "hints"})
    return fmt, hints, meta


def _registered(name: str) -> dict[str, Any]:
    """A registered name's architecture, less its head: the checkpoint's head is kept unless num_classes says."""
    fields = model_config(name).to_dict(training=False)
    fields.pop("num_classes")
    return fields


def _build_target(model: Any, ckpt_arch: dict[str, Any], num_classes, img_size, patch_size
                  ) -> VisionTransformer:
    """The model to load into: the given one (head reset / rebuilt when the overrides change it) or a new one."""
    if isinstance(model, str):
        model = _registered(model)
    if isinstance(model, VisionTransformer):
        arch = architecture_of(model, training=True)
    elif model is None or isinstance(model, Mapping):
        arch = {**ckpt_arch, **(model or {})}
    else:
        raise TypeError(f"model: expected a VisionTransformer, a registered name or a dict of arguments, "
                        f"got {type(model).__name__}")
    new = dict(arch)
    if img_size is not None:
        new["img_size"] = img_size
    if patch_size is not None:
        new["patch_size"] = patch_size
    if num_classes is not None:
        new["num_classes"] = num_classes
    if isinstance(model, VisionTransformer):
        if new["img_size"] != arch["img_size"] or new["patch_size"] != arch["patch_size"]:
            return VisionTransformer(**new)  # a new position table / kernel: rebuild rather than patch in place
        if new["num_classes"] != arch["num_classes"]:
            model.reset_classifier(new["num_classes"])
        return model
    return VisionTransformer(**{k: v for k, v in new.items() if v is not None or k in _NONE_MEANS_SOMETHING})


_NONE_MEANS_SOMETHING = ("fc_norm", "init_values")  # None: timm's pooling rule / no LayerScale


def _adapt(state_dict: dict[str, torch.Tensor], ckpt_config: ViTConfig, model: VisionTransformer,
           fmt: str, interpolation: str, antialias: bool, name: str) -> dict[str, torch.Tensor]:
    """Resample the position embeddings and patch kernel to the model's sizes; drop a head that does not fit."""
    target, ckpt_arch = architecture_of(model), ckpt_config.to_dict()
    weight = state_dict.get("patch_embed.proj.weight")
    # only a patchify kernel covers the patch (a convolutional stem's proj is 1x1, after its stride-2 stages)
    if (ckpt_config.embed_layer == "conv" and weight is not None and weight.ndim == 4
            and weight.shape[-1] != model.patch_size):
        log.info("%s: resampling the patch-embedding kernel %dx%d -> %dx%d", name, weight.shape[-2],
                 weight.shape[-1], model.patch_size, model.patch_size)
        state_dict["patch_embed.proj.weight"] = resample_patch_kernel(
            weight.float(), (model.patch_size, model.patch_size), interpolation, antialias)
    old_grid, new_grid = _grid(ckpt_arch), model.patch_embed.grid_size
    if "pos_embed" in state_dict and tuple(old_grid) != tuple(new_grid):
        log.info("%s: resampling position embeddings %dx%d -> %dx%d (%s)", name, *old_grid, *new_grid, interpolation)
        state_dict["pos_embed"] = resample_pos_embed(
            state_dict["pos_embed"].float(), new_grid, old_grid,
            num_prefix_tokens=ckpt_config.num_pos_prefix_tokens,
            interpolation=interpolation, antialias=antialias)
    extras = getattr(FORMATS[fmt], "HEAD_EXTRAS", ())
    if ckpt_arch["num_classes"] == 0 and any(k.startswith(extras) for k in state_dict):
        # a pooler / pre-logits layer without a classifier after it (HF ViTModel): nothing here uses it
        log.info("%s: dropped %s (no classifier head follows it)", name, "/".join(extras))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(extras)}
    if ckpt_arch["num_classes"] != target["num_classes"]:
        dropped = [k for k in state_dict if k.startswith(("head.", "head_dist.") + extras)]
        for key in dropped:
            del state_dict[key]
        # The fresh head counts as loaded: the key check should not report it missing.
        state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith(("head.", "head_dist."))})
        if target["num_classes"] == 0:
            log.info("%s: num_classes=0: dropped the classifier head (%d classes)", name, ckpt_arch["num_classes"])
        else:
            log.info("%s: re-initialised the classifier head: the checkpoint has %d classes, the model %d",
                     name, ckpt_arch["num_classes"], target["num_classes"])
    return state_dict


def _check_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module, strict: bool, name: str) -> None:
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
                  if k in expected and v.shape != expected[k].shape}
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{name}: the checkpoint does not fit the model "
                 f"(embed_dim={model.embed_dim}, depth={len(model.blocks)}, img_size={list(model.img_size)}, "
                 f"patch_size={model.patch_size}, num_classes={model.num_classes})"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        for key, (got, want) in mismatched.items():
            lines.append(f"  wrong shape: {key}: checkpoint {list(got)} vs model {list(want)}")
        raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)
    if missing or unexpected:
        log.warning("%s: strict=False: %d missing keys keep their initial values (%s); %d unexpected keys ignored (%s)",
                    name, len(missing), ", ".join(missing[:8]), len(unexpected), ", ".join(unexpected[:8]))


def load_pretrained(source: str | os.PathLike | Mapping[str, torch.Tensor], *, model: Any = None,
                    num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                    patch_size: int | None = None, strict: bool = True, interpolation: str = "bicubic",
                    antialias: bool = True) -> VisionTransformer:
    """Load weights from timm, DeiT, torchvision, Hugging Face, Google ``.npz``, Lightning or our own layout.

    ``source`` is a file (the container is recognised from its bytes), a directory (Hugging Face, timm hub
    or ``save_pretrained`` layout), ``hf-hub:ORG/REPO``, ``timm:model.tag``, or an in-memory state dict.
    The format is detected from the keys. Without ``model`` the architecture is inferred from tensor shapes
    and config files. A bare torchvision/timm state dict does not record the number of heads: for the standard
    widths (192/384/768/1024/1280) the standard number is assumed, with a warning; any other width raises
    ``CheckpointError`` rather than guess (a wrong guess loads and gives other outputs). Pass ``model=`` or
    ``model={"num_heads": N}`` to set it. ``model`` may be a ``VisionTransformer``, a registered name or a dict
    of ``ViTConfig`` fields.

    ``img_size``/``patch_size`` different from the checkpoint's resample the position embeddings / patch
    kernel with ``interpolation`` (default bicubic, as timm; torchvision and HF also resample bicubic, the
    original JAX code bilinear). ``num_classes`` different re-initialises the head (logged); 0 drops it.
    Anything else that does not fit raises ``CheckpointError`` listing missing, unexpected and wrong-shape
    keys. The result carries ``model.pretrained_cfg``: source, format, class_names, mean, std, img_size,
    interpolation (of the source's image preprocessing) and crop_pct.

    Example:
        >>> import tempfile
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_pretrained(m, tmp, mean=[0.5] * 3, std=[0.5] * 3)
        ...     model = load_pretrained(tmp, num_classes=10, img_size=64)  # new head, resampled position embeddings
        >>> model.num_classes, model.img_size, model.pretrained_cfg["mean"]
        (10, (64, 64), [0.5, 0.5, 0.5])
    """
    raw = read(source)
    name = raw.name
    try:
        return _load(raw, source, name, model, num_classes, img_size, patch_size, strict, interpolation, antialias)
    except (CheckpointError, TypeError):
        raise
    except ValueError as error:  # an impossible architecture from the checkpoint or the overrides
        raise CheckpointError(f"{name}: {error}") from error
    except (KeyError, IndexError, RuntimeError) as error:  # tensors of shapes no real checkpoint has
        raise CheckpointError(f"{name}: malformed checkpoint ({type(error).__name__}: {error})") from error


def _load(raw, source, name, model, num_classes, img_size, patch_size, strict, interpolation, antialias):
    try:
        fmt, prefix = detect_format(raw.state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{name}: {error}") from None
    state_dict = FORMATS[fmt].to_timm(_strip(raw.state_dict, prefix))
    fmt_name, hints, meta = _hints_and_meta(raw, fmt, state_dict)
    if isinstance(model, str):
        model = _registered(model)
    # What the caller says about the model also tells what the checkpoint cannot (heads, a non-square grid).
    if isinstance(model, VisionTransformer):
        hints = {**hints, **architecture_of(model)}
    elif isinstance(model, Mapping):
        hints = {**hints, **model}
    ckpt_config = infer_architecture(state_dict, hints, name)  # raises if heads are unknown and not guessable
    if not hints.get("num_heads"):
        log.warning("%s: the checkpoint does not record the number of attention heads; assuming %d, the "
                    "standard for embed_dim %d. Pass model={'num_heads': N} if that is wrong.",
                    name, ckpt_config.num_heads, ckpt_config.embed_dim)
    ckpt_arch = ckpt_config.to_dict()
    target = _build_target(model, ckpt_arch, num_classes, img_size, patch_size)
    state_dict = _adapt(state_dict, ckpt_config, target, fmt, interpolation, antialias, name)
    _check_keys(state_dict, target, strict, name)
    expected = target.state_dict()
    target.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    head_kept = ckpt_arch["num_classes"] == target.num_classes
    class_names = meta.get("class_names") if head_kept else None
    if class_names is not None and len(class_names) != target.num_classes:
        log.warning("%s: %d class names for %d classes; ignoring them", name, len(class_names), target.num_classes)
        class_names = None
    height, width = target.img_size
    target.pretrained_cfg = {
        "source": str(source) if not isinstance(source, Mapping) else "<state dict>",
        "format": fmt_name, "file": name,
        "num_classes": target.num_classes, "class_names": list(class_names) if class_names else None,
        "mean": _floats(meta.get("mean")), "std": _floats(meta.get("std")),
        "img_size": [height, width], "interpolation": meta.get("interpolation", "bicubic"),
        "crop_pct": meta.get("crop_pct"),
    }
    return target


def _floats(values):
    return [float(v) for v in values] if values is not None else None


# ---- saving and export -------------------------------------------------------------------------------------
def save_pretrained(model: VisionTransformer, directory: str | os.PathLike, class_names: list[str] | None = None,
                    mean: list[float] | None = None, std: list[float] | None = None) -> Path:
    """Write ``config.json`` (architecture, class names, mean/std, image size) and ``model.safetensors``.

    ``class_names``/``mean``/``std`` default to ``model.pretrained_cfg`` when the model was loaded with
    ``load_pretrained``. Files are written to temporary names and renamed, so an interrupted save never
    leaves a half-written checkpoint. ``load_pretrained(directory)`` gives back the same model.

    Example:
        >>> import tempfile
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     directory = save_pretrained(m, f"{tmp}/my_vit", class_names=["cat", "dog"],
        ...                                 mean=[0.5] * 3, std=[0.5] * 3)
        ...     sorted(f.name for f in directory.iterdir()), load_pretrained(directory).pretrained_cfg["class_names"]
        (['config.json', 'model.safetensors'], ['cat', 'dog'])
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = dict(getattr(model, "pretrained_cfg", None) or {})
    class_names = list(class_names) if class_names is not None else previous.get("class_names")
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for a model with {model.num_classes} classes")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != model.in_chans:
            raise ValueError(f"{key}: expected {model.in_chans} values (one per channel), got {list(value)}")
    height, width = model.img_size
    pretrained_cfg = {**previous, "class_names": class_names, "num_classes": model.num_classes,
                      "mean": _floats(mean if mean is not None else previous.get("mean")),
                      "std": _floats(std if std is not None else previous.get("std")),
                      "img_size": [height, width]}
    pretrained_cfg.setdefault("interpolation", "bicubic")
    pretrained_cfg.pop("file", None)
    config = {"format": CONFIG_FORMAT, "architecture": architecture_of(model), "pretrained_cfg": pretrained_cfg}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as part:
        save_file(tensors, str(part))
    with atomic_path(directory / "config.json") as part:
        part.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def hf_module(model: VisionTransformer | Mapping[str, Any]):
    """The Hugging Face map that fits a model (or its architecture dict): ``hf_dinov2`` for LayerScale with a
    class token (``Dinov2Model``, ``Dinov2WithRegistersModel``), ``hf_clip`` for ``pre_norm``
    (``CLIPVisionModelWithProjection``), ``hf_siglip`` for ``map`` pooling (``SiglipVisionModel``), else ``hf``
    (``ViTForImageClassification``). Its ``from_timm`` writes the weights, its ``config`` the config.json.

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
        ...                       class_token=False, global_pool="map")
        >>> hf_module(m).config(architecture_of(m))["architectures"]
        ['SiglipVisionModel']
    """
    arch = architecture_of(model) if isinstance(model, VisionTransformer) else model
    if arch.get("init_values") and arch.get("class_token", True):
        return hf_dinov2
    if arch.get("pre_norm"):
        return hf_clip
    if arch.get("global_pool") == "map":
        return hf_siglip
    return hf


def export_state_dict(model: VisionTransformer, format: str = "timm", **options: Any) -> dict[str, Any]:
    """Our weights in another library's layout: ``"timm"``, ``"torchvision"``, ``"hf"`` (file names of the
    Hugging Face class that fits the model, see ``hf_module``; ``hf_module(model).config(architecture_of(model))``
    is its config.json), ``"npz"`` (numpy arrays for ``np.savez``; ``big_vision=True`` for that convention), or an
    original release's layout: ``"openclip"`` (OpenAI CLIP / OpenCLIP image tower), ``"dinov2"``, ``"deit3"``.

    Example:
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> "conv_proj.weight" in export_state_dict(m, "torchvision")
        True
    """
    state_dict = model.state_dict()
    arch = architecture_of(model)
    if format == "timm":
        return timm.from_timm(state_dict)
    if format == "torchvision":
        return torchvision.from_timm(state_dict, arch)
    if format == "hf":
        return hf_module(arch).from_timm(state_dict, arch)
    if format == "npz":
        return npz.from_timm(state_dict, arch, **options)
    if format in (openclip.NAME, dinov2.NAME, deit3.NAME):
        return FORMATS[format].from_timm(state_dict, arch, **options)
    raise ValueError(f"format: expected one of timm, torchvision, hf, npz, openclip, dinov2, deit3; got {format!r}")
