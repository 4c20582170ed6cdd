"""OpenAI CLIP and OpenCLIP image towers <-> our (timm) layout.

Two layouts, both with or without the ``visual.`` prefix of a whole CLIP state dict (whose text tower,
``token_embedding``, ``logit_scale`` ... are not ours and are dropped, with a log line):

- the native tower (OpenAI's ``clip`` package, OpenCLIP's ``VisionTransformer``): ``conv1`` (no bias),
  ``class_embedding`` (D,), ``positional_embedding`` (N, D), ``ln_pre``, ``transformer.resblocks.N`` with
  ``nn.MultiheadAttention`` (``in_proj_weight`` is q, k, v stacked, as timm's ``qkv``), ``ln_post`` and
  ``proj`` (D, E), the image-embedding projection: ``x @ proj``, so our ``head.weight`` is ``proj.T`` with a
  zero bias and ``model(x)`` is ``encode_image(x)``. LayerNorm eps 1e-5; token pooling (``pool_type='tok'``).
- OpenCLIP towers built on timm (``timm_model_name``): ``trunk.*`` holds timm's keys as they are; a
  ``head.proj`` projection (``timm_proj='linear'``) becomes our head.

What the weights cannot tell: the activation and the pooling. OpenAI's models use QuickGELU; OpenCLIP's
use GELU unless their config says ``quick_gelu`` (the ``-quickgelu`` names, OpenCLIP's copies of OpenAI's
weights); towers on timm always use the timm model's own activation. Only the state dict of OpenAI's
TorchScript files (``torch.jit.load(path).state_dict()``) says so itself: it has the integer entries
``input_resolution``, ``context_length`` and ``vocab_size``, which ``hints`` reads. Otherwise pass
``model={"act_layer": "quick_gelu"}``, a registered ``*_clip_quickgelu_*`` name, or ``read_config`` of the
model's ``open_clip_config.json``. OpenCLIP's timm towers pool with ``timm_pool`` (default ``'avg'``), which
also is not in the weights: ``model={"global_pool": "avg"}`` or ``read_config``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.registry import MODELS
from ._common import CheckpointError, rename

log = logging.getLogger(__name__)

NAME = "openclip"
# class_embedding: the native tower's (Hugging Face CLIP spells it vision_model.embeddings.class_embedding);
# trunk.patch_embed: a timm tower inside OpenCLIP's TimmModel. Both only under visual. or at the root.
SIGNATURE = r"(?:visual\.)?(?:class_embedding|trunk\.patch_embed\.proj\.weight)"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULTS: dict[str, Any] = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                            "crop_pct": 1.0}
NORM_EPS = 1e-5  # OpenAI's and OpenCLIP's LayerNorm: torch's default
# Integer entries of the state dict of OpenAI's TorchScript files (their clip.load deletes them)
OPENAI_JIT_KEYS = ("input_resolution", "context_length", "vocab_size")

_BLOCK = "transformer.resblocks.{i}."
RULES = [
    ("conv1.", "patch_embed.proj."),
    ("ln_pre.", "norm_pre."),
    (_BLOCK + "ln_1.", "blocks.{i}.norm1."),
    (_BLOCK + "attn.in_proj_weight", "blocks.{i}.attn.qkv.weight"),
    (_BLOCK + "attn.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
    (_BLOCK + "attn.out_proj.", "blocks.{i}.attn.proj."),
    (_BLOCK + "ls_1.", "blocks.{i}.ls1."),
    (_BLOCK + "ln_2.", "blocks.{i}.norm2."),
    (_BLOCK + "mlp.c_fc.", "blocks.{i}.mlp.fc1."),
    (_BLOCK + "mlp.c_proj.", "blocks.{i}.mlp.fc2."),
    (_BLOCK + "ls_2.", "blocks.{i}.ls2."),
    ("ln_post.", "norm."),
]


def _image_tower(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's entries without ``visual.``; a whole CLIP's other entries are dropped (logged)."""
    if not any(k.startswith("visual.") for k in state_dict):
        return dict(state_dict)
    other = sorted({k.split(".")[0] for k in state_dict if not k.startswith("visual.")})
    if other:
        log.info("openclip: ignored the text tower and contrastive parameters (%s)", ", ".join(other))
    return {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP / OpenCLIP image tower (a whole CLIP state dict or ``model.visual``'s) -> ours.

    Parts we do not model (OpenCLIP's attentional pooler, its MLP projection ``head.mlp``) keep their names,
    so the key check lists them.

    Example:
        >>> sd = {"visual.class_embedding": torch.zeros(8), "visual.proj": torch.zeros(8, 4),
        ...       "logit_scale": torch.tensor(4.6)}
        >>> {k: tuple(v.shape) for k, v in to_timm(sd).items()}
        {'cls_token': (1, 1, 8), 'head.weight': (4, 8), 'head.bias': (4,)}
    """
    tower = _image_tower(state_dict)
    if any(k.startswith("trunk.") for k in tower):
        out = {k.removeprefix("trunk."): v for k, v in tower.items()}
        if "head.proj.weight" in out:  # timm_proj='linear': no bias unless timm_proj_bias
            weight = out.pop("head.proj.weight")
            out["head.weight"] = weight
            out["head.bias"] = out.pop("head.proj.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
        return out
    out = rename(tower, RULES)
    if "class_embedding" in out:
        out["cls_token"] = out.pop("class_embedding").reshape(1, 1, -1)
    if "positional_embedding" in out:
        out["pos_embed"] = out.pop("positional_embedding").unsqueeze(0)
    proj = out.pop("proj", None)
    if proj is not None:
        out["head.weight"] = proj.t().contiguous()
        out["head.bias"] = torch.zeros(proj.shape[1], dtype=proj.dtype)
    return out


def hints(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a native tower's format says that its shapes do not: LayerNorm eps 1e-5, and QuickGELU where the
    state dict is one of OpenAI's TorchScript files (``OPENAI_JIT_KEYS``). Nothing for towers on timm.

    Example:
        >>> jit = {"visual.class_embedding": torch.zeros(8), **{k: torch.tensor(77) for k in OPENAI_JIT_KEYS}}
        >>> hints(jit), hints({"visual.class_embedding": torch.zeros(8)})
        ({'norm_eps': 1e-05, 'act_layer': 'quick_gelu'}, {'norm_eps': 1e-05})
    """
    if any(re.match(r"^(?:.*\.)?trunk\.patch_embed\.", k) for k in state_dict):
        return {}
    found: dict[str, Any] = {"norm_eps": NORM_EPS}
    if all(any(k == name or k.endswith("." + name) for k in state_dict) for name in OPENAI_JIT_KEYS):
        found["act_layer"] = "quick_gelu"
    return found


def read_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenCLIP's ``open_clip_config.json`` (or a bare model config, as in ``open_clip/model_configs``) ->
    (architecture hints, preprocessing), for ``load_pretrained(path, model=hints)``.

    Example:
        >>> cfg = {"model_cfg": {"quick_gelu": True, "vision_cfg": {"width": 768, "image_size": 224}},
        ...        "preprocess_cfg": {"mean": [0.5] * 3}}
        >>> read_config(cfg)
        ({'img_size': 224, 'act_layer': 'quick_gelu', 'norm_eps': 1e-05, 'num_heads': 12}, {'mean': [0.5, 0.5, 0.5]})
    """
    model_cfg = config.get("model_cfg", config)
    vision = model_cfg.get("vision_cfg") or {}
    found: dict[str, Any] = {}
    if vision.get("image_size") is not None:
        found["img_size"] = vision["image_size"]
    timm_name = vision.get("timm_model_name")
    if timm_name:  # the timm model's own activation and norms; the pooling is OpenCLIP's timm_pool
        registered = MODELS.get(timm_name)
        pool = vision.get("timm_pool", "avg")
        if registered is not None:
            found.update(registered.to_dict(training=False))
            del found["num_classes"]  # the checkpoint's projection decides
            found["fc_norm"] = registered.uses_fc_norm  # timm builds the norm for its own default pooling
        if pool in ("avg", "token", "map"):
            found["global_pool"] = pool
        elif pool:
            raise CheckpointError(f"OpenCLIP config: timm_pool={pool!r} has no counterpart here")
    else:
        if model_cfg.get("quick_gelu"):
            found["act_layer"] = "quick_gelu"
        found["norm_eps"] = NORM_EPS
        width = vision.get("width", 768)
        found["num_heads"] = width // vision.get("head_width", 64)
        if vision.get("pool_type", "tok") == "avg":
            found["global_pool"] = "avg"
        if vision.get("ls_init_value") is not None:
            found["init_values"] = vision["ls_init_value"]
    preprocess = config.get("preprocess_cfg") or {}
    meta = {k: preprocess[k] for k in ("mean", "std", "interpolation") if preprocess.get(k) is not None}
    return found, meta


def from_timm(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any],
              prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Ours -> the native tower's layout, loadable by an OpenCLIP ``CLIP`` (``prefix="visual."``, with
    ``strict=False`` as the text tower is not here) or its ``VisionTransformer`` (``prefix=""``).

    The head becomes ``proj``, which has no bias: a head with a non-zero bias, and anything the native tower
    lacks (no ``pre_norm``, no class token, registers, distillation, ``fc_norm``, SwiGLU), raise
    ``CheckpointError``. Missing qkv biases are written as zeros (the same function).

    Example:
        >>> from vit import VisionTransformer
        >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=16,
        ...                       pre_norm=True)
        >>> with torch.no_grad():
        ...     _ = m.head.bias.zero_()
        >>> from_timm(m.state_dict(), m.config.to_dict())["visual.proj"].shape
        torch.Size([32, 16])
    """
    problems = [text for bad, text in (
        (not architecture.get("pre_norm"), "no pre_norm (the native tower has ln_pre and no patch bias)"),
        (not architecture.get("class_token", True), "no class token"),
        (architecture.get("reg_tokens"), "register tokens"), (architecture.get("distilled"), "a distillation token"),
        (architecture.get("no_embed_class"), "no_embed_class"), (architecture.get("fc_norm"), "fc_norm"),
        (architecture.get("global_pool", "token") not in ("token", "avg"), "attention or no pooling"),
        (architecture.get("mlp_layer", "mlp") != "mlp", "a SwiGLU MLP"),
        (not architecture.get("final_norm", True), "no final norm"),
    ) if bad]
    head_bias = state_dict.get("head.bias")
    if head_bias is not None and bool(head_bias.detach().ne(0).any()):
        problems.append("a head with a bias (CLIP's proj has none)")
    if problems:
        raise CheckpointError("the OpenCLIP image tower cannot hold this model: " + "; ".join(problems))
    out = {k: v.detach().clone() for k, v in state_dict.items() if k not in ("head.weight", "head.bias")}
    out["cls_token"] = out["cls_token"].reshape(-1)
    out["pos_embed"] = out["pos_embed"][0]
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        out.setdefault(key[:-len("weight")] + "bias", torch.zeros(out[key].shape[0], dtype=out[key].dtype))
    out = rename(out, RULES, reverse=True)
    out["class_embedding"] = out.pop("cls_token")
    out["positional_embedding"] = out.pop("pos_embed")
    if "head.weight" in state_dict:
        out["proj"] = state_dict["head.weight"].detach().t().contiguous()
    return {prefix + k: v for k, v in out.items()}
