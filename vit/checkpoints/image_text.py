"""Whole CLIP / SigLIP models: ``load_image_text`` (both towers, the temperature, the tokenizer) and export back
to the Hugging Face and OpenCLIP layouts.

The image tower goes through ``load_pretrained``'s own path (same format detection, maps and checks); the text
tower through ``text_towers``; the tokenizer through ``tokenizer``. A source without a text tower is a
``CheckpointError`` that says what was looked for.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.image_text import ImageTextModel
from ..models.text import TextConfig, TextTransformer
from ..models.vision import VisionTransformer
from ..utils.files import atomic_path
from . import hf_clip, hf_siglip, openclip, text_towers
from ._arch import architecture_of
from ._common import CheckpointError
from ._read import CONFIG_FILES, RawCheckpoint, read, read_directory, resolve_hub
from .hf_common import act_layer, hidden_act
from .tokenizer import TOKENIZER_FILES, OpenCLIPTokenizer, find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
OPENAI_VOCAB_SIZE = 49408  # OpenAI CLIP: 256 bytes x 2 (with and without </w>), 48894 merges, start and end

# what each text format keeps of the whole state dict for the image tower
_TEXT_SIDE = {"hf_clip": ("text_model.", "text_projection.", "logit_scale"),
              "hf_siglip": ("text_model.", "logit_scale", "logit_bias")}
_HF_TEXT_DEFAULTS = {"hf_clip": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},  # transformers' own defaults
                     "hf_siglip": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}}


def _read_source(source: Any) -> tuple[RawCheckpoint, dict[str, Path]]:
    """The checkpoint and the files beside it (tokenizer files of a directory or hub repository)."""
    if isinstance(source, str) and source.startswith("hf-hub:"):
        files, name = resolve_hub(source, extra=TOKENIZER_FILES)
        return read_directory(files, name), files
    raw = read(source)
    path = Path(source) if not isinstance(source, Mapping) else None
    files = {p.name: p for p in path.iterdir() if p.is_file()} if path is not None and path.is_dir() else {}
    return raw, files


def _vision_part(raw: RawCheckpoint, fmt: str) -> RawCheckpoint:
    """The checkpoint less its text side, so the image loader sees an image tower (and logs nothing dropped)."""
    keys = raw.state_dict
    if fmt in _TEXT_SIDE:
        kept = {k: v for k, v in keys.items() if not k.startswith(_TEXT_SIDE[fmt])}
    elif fmt == "openclip":
        kept = {k: v for k, v in keys.items() if k.startswith("visual.")}
    else:  # npz
        kept = {k: v for k, v in keys.items() if k.startswith("params/img/")}
    return RawCheckpoint(kept, raw.name, raw.container, raw.config, raw.preprocessor, dict(raw.meta))


def _text_hints(fmt: str, raw: RawCheckpoint, quick_gelu: bool | None) -> dict[str, Any]:
    """What the configs (or the format's convention) say about the text tower that its shapes do not."""
    config = raw.config or {}
    if fmt in ("hf_clip", "hf_siglip"):
        text = {**_HF_TEXT_DEFAULTS[fmt], **(config.get("text_config") or {})}
        hints: dict[str, Any] = {"act_layer": act_layer(text["hidden_act"], "text"),
                                 "norm_eps": text["layer_norm_eps"]}
        if text.get("num_attention_heads"):
            hints["num_heads"] = text["num_attention_heads"]
        if fmt == "hf_siglip":
            hints.update(causal=False, pool="last")
        else:  # transformers pools at the highest id for configs with the old eos id 2, else at the first eos
            eos = text.get("eos_token_id", 2)
            hints.update(causal=True, pool="argmax") if eos == 2 else hints.update(causal=True, pool="eos",
                                                                                  eos_token_id=eos)
    elif fmt == "npz":
        hints = {"act_layer": "gelu_tanh", "norm_eps": 1e-6, "causal": False, "pool": "last",
                 "num_heads": text_towers.npz_num_heads(raw.state_dict)}
    else:
        model_cfg = config.get("model_cfg", config)
        text = model_cfg.get("text_cfg") or {}
        if text.get("hf_model_name"):
            raise CheckpointError(f"{raw.name}: the text tower is a Hugging Face model ({text['hf_model_name']}), "
                                  f"not a CLIP text transformer; it is not supported")
        hints = {"norm_eps": openclip.NORM_EPS, "causal": not text.get("no_causal_mask", False),
                 "pool": text.get("pool_type", "argmax")}  # open_clip's names are ours; others fail in TextConfig
        if text.get("pool_type") == "eos":
            hints["eos_token_id"] = text.get("eos_id", 2)
        if text.get("width") and text.get("heads"):
            hints["num_heads"] = text["heads"]
        elif text.get("width"):
            hints["num_heads"] = text["width"] // 64
        if text.get("ls_init_value") is not None:
            hints["init_values"] = text["ls_init_value"]
        if text.get("embed_cls"):
            raise CheckpointError(f"{raw.name}: a text tower with an appended class token (CoCa) is not supported")
        if (text.get("norm_kwargs") or {}).get("eps") is not None:  # OpenCLIP's SigLIP configs: 1e-6
            hints["norm_eps"] = text["norm_kwargs"]["eps"]
        jit = all(k in raw.state_dict for k in openclip.OPENAI_JIT_KEYS)
        hints["act_layer"] = "quick_gelu" if model_cfg.get("quick_gelu") or jit else "gelu"
        act_kwargs = text.get("act_kwargs") or {}
        if act_kwargs and (act_kwargs != {"approximate": "tanh"} or hints["act_layer"] != "gelu"):
            raise CheckpointError(f"{raw.name}: text_cfg.act_kwargs={act_kwargs} has no counterpart here "
                                  f"(only GELU's approximate='tanh' does)")
        if act_kwargs:  # SigLIP 2: nn.GELU(approximate="tanh")
            hints["act_layer"] = "gelu_tanh"
    if quick_gelu is not None:
        hints["act_layer"] = "quick_gelu" if quick_gelu else ("gelu" if hints["act_layer"] == "quick_gelu"
                                                              else hints["act_layer"])
    return hints


def _text_state_dict(fmt: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if fmt in ("hf_clip", "hf_siglip"):
        return text_towers.hf_to_ours(state_dict)
    if fmt == "npz":
        return text_towers.npz_to_ours(state_dict)
    return text_towers.openclip_to_ours(state_dict)


def _logits(fmt: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if fmt == "npz":
        return text_towers.npz_logits(state_dict)
    return {k: state_dict[k].reshape(()) for k in text_towers.LOGIT_KEYS if k in state_dict}


def _tokenizer(tokenizer: Any, fmt: str, raw: RawCheckpoint, files: dict[str, Path], context_length: int,
               vocab_size: int, name: str):
    """The caller's tokenizer (callable or path), else the checkpoint's files, else open_clip's bundled vocabulary
    for CLIP weights with OpenAI's vocabulary size; else None (logged: a big_vision .npz has no tokenizer files)."""
    if callable(tokenizer):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, context_length)
    found = find_tokenizer(files, context_length)
    if found is not None:
        return found
    config = raw.config or {}
    hf_name = ((config.get("model_cfg", config).get("text_cfg") or {}).get("hf_tokenizer_name")
               if fmt == "openclip" else None)
    if hf_name:  # OpenCLIP's SigLIP repositories name a hub tokenizer instead of shipping one
        hub_files, _ = resolve_hub(f"hf-hub:{hf_name}", extra=TOKENIZER_FILES, weights=False)
        found = find_tokenizer(hub_files, context_length)
        if found is not None:
            return found
    if fmt in ("openclip", "hf_clip") and vocab_size == OPENAI_VOCAB_SIZE:
        # OpenAI's vocabulary, as open_clip ships it; padding differs from HF's (0, not the end token), which the
        # causal mask keeps from the pooled end token
        log.info("%s: no tokenizer files with the weights; using the BPE vocabulary inside open_clip", name)
        return OpenCLIPTokenizer(context_length)
    log.warning("%s: no tokenizer files with the weights; pass tokenizer= (a tokenizer.json / spiece.model file or "
                "directory, 'openclip' for OpenAI's vocabulary, or a callable) to load_image_text, or set "
                "model.tokenizer", name)
    return None


def load_image_text(source: str | os.PathLike | Mapping[str, torch.Tensor], *, vision: Mapping[str, Any] | None = None,
                    text: Mapping[str, Any] | None = None, quick_gelu: bool | None = None,
                    tokenizer: str | os.PathLike | Callable | None = None, strict: bool = True) -> ImageTextModel:
    """A whole CLIP / SigLIP model: image tower, text tower, ``logit_scale`` (and SigLIP's ``logit_bias``) and the
    checkpoint's own tokenizer, as an ``ImageTextModel``.

    ``source``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` directory or ``hf-hub:ORG/REPO``; an OpenAI CLIP or
    OpenCLIP state dict (a file or in memory; ``visual.*``, ``token_embedding``, ``transformer.*``, ``ln_final``,
    ``text_projection``, ``logit_scale``); an open_clip directory or hub repository (``open_clip_config.json`` +
    ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``); a big_vision SigLIP ``.npz``
    (``params/img/...``, ``params/txt/...``, ``params/t``, ``params/b``). The format is detected from the keys.

    Hints for what the weights do not record: ``vision`` / ``text`` (``ViTConfig`` / ``TextConfig`` fields, e.g.
    ``text={"num_heads": 8}``), ``quick_gelu`` (both towers; OpenAI's weights use QuickGELU, as for
    ``load_pretrained``), ``tokenizer`` (a callable, a tokenizer file or directory, or ``"openclip"``).

    Example:
        >>> model = load_image_text("hf-hub:openai/clip-vit-base-patch32")  # doctest: +SKIP
        >>> image_features = model.encode_image(images, normalize=True)  # doctest: +SKIP
        >>> text_features = model.encode_text(model.tokenizer(["a photo of a cat"]), normalize=True)  # doctest: +SKIP
    """
    from . import _load, detect_format  # the image loader; imported here as it imports this module's package
    raw, files = _read_source(source)
    if "image_text" in raw.meta:  # a checkpoint of our own ImageTextModule: it records both towers
        from .trained_image_text import load_trained
        return load_trained(raw, tokenizer, strict)
    name = raw.name
    fmt = text_towers.text_format(raw.state_dict)
    if fmt is None:
        try:
            image_format, _ = detect_format(raw.state_dict)
            what = f"an image tower only ({image_format} format)"
        except CheckpointError:
            what = "neither a known image tower nor a text tower"
        raise CheckpointError(
            f"{name}: holds {what}; no text tower found. Looked for one of: "
            + "; ".join(f"{f}: {s}" for f, s in text_towers.TEXT_SIGNATURES.items())
            + ". Use vit.load_pretrained for an image tower alone.")
    try:
        hints = {**_text_hints(fmt, raw, quick_gelu), **(text or {})}
        text_sd = _text_state_dict(fmt, raw.state_dict)
        fields = text_towers.infer_text_config(text_sd, hints, name)
        if hints.get("num_heads") is None:
            log.warning("%s: the text tower does not record its attention heads; assuming %d (width / 64, OpenAI's "
                        "rule). Pass text={'num_heads': N} if that is wrong.", name, fields["num_heads"])
        text_model = TextTransformer(TextConfig.from_dict(fields))
        _load_checked(text_model, text_sd, strict, f"{name} (text tower)")
        # big_vision's SigLIP image towers use Flax's default gelu (the tanh form), which their arrays cannot say
        vision_hints = {**({"act_layer": "gelu_tanh"} if fmt == "npz" else {}), **(vision or {})}
        if quick_gelu is not None:
            vision_hints.setdefault("act_layer", "quick_gelu" if quick_gelu else "gelu")
        visual = _load(_vision_part(raw, fmt), source if not isinstance(source, Mapping) else {}, name,
                       vision_hints or None, None, None, None, strict, "bicubic", True)
        logits = _logits(fmt, raw.state_dict)
        if "logit_scale" not in logits:
            log.warning("%s: no logit_scale; starting at log(1/0.07) (CLIP's initial temperature)", name)
        model = ImageTextModel(visual, text_model,
                               init_logit_scale=float(logits.get("logit_scale", torch.tensor(math.log(1 / 0.07)))),
                               init_logit_bias=float(logits["logit_bias"]) if "logit_bias" in logits else None)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{name}: {error}") from error
    except (KeyError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{name}: malformed checkpoint ({type(error).__name__}: {error})") from error
    model.tokenizer = _tokenizer(tokenizer, fmt, raw, files, text_model.context_length, text_model.vocab_size, name)
    visual.pretrained_cfg["text_format"] = fmt  # marks the tower as one half of a joint image-text space
    model.pretrained_cfg = visual.pretrained_cfg
    return model


def _load_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, name: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
                  if k in expected and v.shape != expected[k].shape}
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{name}: the weights do not fit the text tower they describe"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        lines += [f"  wrong shape: {k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in mismatched.items()]
        raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)


# ---- export ----------------------------------------------------------------------------------------------------
def _is_siglip(model: ImageTextModel) -> bool:
    return not model.text.config.causal


def export_image_text(model: ImageTextModel, format: str = "hf") -> dict[str, torch.Tensor]:
    """Both towers and the temperature in another library's layout: ``"hf"`` (``CLIPModel`` for a causal text
    tower, ``SiglipModel`` for a bidirectional one; ``image_text_hf_config`` writes its config.json) or
    ``"openclip"`` (open_clip's ``CLIP``: ``visual.*`` + text keys at the root; loads with ``strict=True``).

    Example:
        >>> from vit.models import ImageTextModel, TextConfig, ViTConfig
        >>> m = ImageTextModel(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        ...                              num_classes=16, pre_norm=True, global_pool="token"),
        ...                    TextConfig(context_length=8, vocab_size=50, embed_dim=32, depth=1, num_heads=2,
        ...                               proj_dim=16))
        >>> with torch.no_grad():
        ...     _ = m.visual.head.bias.zero_()
        >>> sorted(export_image_text(m, "openclip"))[:3]
        ['ln_final.bias', 'ln_final.weight', 'logit_scale']
    """
    vision_sd, text_sd = model.visual.state_dict(), model.text.state_dict()
    arch = architecture_of(model.visual)
    logits = {k: getattr(model, k).detach().clone() for k in text_towers.LOGIT_KEYS if getattr(model, k) is not None}
    if format == "openclip":
        if model.logit_bias is not None or _is_siglip(model):
            raise CheckpointError("open_clip's CLIP layout holds CLIP models (causal text, no logit_bias); export a "
                                  "SigLIP model with format='hf'")
        return {**openclip.from_timm(vision_sd, arch), **text_towers.ours_to_openclip(text_sd), **logits}
    if format == "hf":
        siglip = _is_siglip(model)
        vision = (hf_siglip if siglip else hf_clip).from_timm(vision_sd, arch)
        if siglip:  # SiglipModel keeps both as 1-element vectors, CLIPModel its scale as a scalar
            logits = {k: v.reshape(1) for k, v in logits.items()}
        return {**vision, **text_towers.ours_to_hf(text_sd, siglip), **logits}
    raise ValueError(f"format: expected 'hf' or 'openclip', got {format!r}")


def image_text_hf_config(model: ImageTextModel) -> dict[str, Any]:
    """The ``config.json`` of ``export_image_text(model, "hf")``: a ``CLIPConfig`` or ``SiglipConfig`` dict."""
    config = model.text.config
    siglip = _is_siglip(model)
    vision = (hf_siglip if siglip else hf_clip).config(architecture_of(model.visual))
    vision = {k: v for k, v in vision.items() if k != "architectures"}
    text = {"hidden_size": config.embed_dim, "intermediate_size": round(config.embed_dim * config.mlp_ratio),
            "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
            "max_position_embeddings": config.context_length, "vocab_size": config.vocab_size,
            "hidden_act": hidden_act({"act_layer": config.act_layer}), "layer_norm_eps": config.norm_eps}
    if siglip:
        text.update(model_type="siglip_text_model", projection_size=model.text.output_dim)
        vision["model_type"] = "siglip_vision_model"
        return {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text,
                "vision_config": vision}
    text.update(model_type="clip_text_model", projection_dim=model.text.output_dim,
                eos_token_id=2 if config.pool == "argmax" else config.eos_token_id)
    vision.update(model_type="clip_vision_model", projection_dim=model.text.output_dim)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "text_config": text, "vision_config": vision,
            "projection_dim": model.text.output_dim, "logit_scale_init_value": model.logit_scale.item()}


def save_image_text(model: ImageTextModel, directory: str | os.PathLike) -> Path:
    """A Hugging Face ``CLIPModel`` / ``SiglipModel`` directory (``model.safetensors`` + ``config.json``) that both
    transformers and ``load_image_text`` read. Tokenizer files are the tokenizer's own business: copy them beside."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in export_image_text(model, "hf").items()}
    with atomic_path(directory / "model.safetensors") as part:
        save_file(tensors, str(part))
    with atomic_path(directory / "config.json") as part:
        part.write_text(json.dumps(image_text_hf_config(model), indent=2) + "\n", encoding="utf-8")
    return directory


__all__ = ["load_image_text", "export_image_text", "image_text_hf_config", "save_image_text", "CONFIG_FILES"]
