"""ViTConfig: the one description of a Vision Transformer architecture.

The model is built from it, the registry is a table of them, checkpoint inference returns one,
``save_pretrained`` writes it and ``ImageClassifier`` takes its fields. A new architecture option is a new
field here (with its check in ``_problems``), and every one of those places sees it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

GLOBAL_POOLS = ("token", "avg", "map", "")  # "map": attention pooling (SigLIP); "": no pooling, all tokens
ACT_LAYERS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
MLP_LAYERS = ("mlp", "swiglu")
EMBED_LAYERS = ("conv", "spt", "conv_stem")
ATTN_LAYERS = ("mha", "lsa")
# Regularisation, not architecture: a checkpoint cannot tell them and a config read back from one leaves them 0.
TRAINING_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate", "patch_drop_rate")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT / DeiT in timm's argument names; invalid values fail at construction.

    Args:
        img_size: input size, ``int`` for square images or ``(height, width)``.
        patch_size: side of the square patches (the image size must be divisible by it).
        in_chans: input channels.
        num_classes: classifier outputs; 0 = no head (``forward`` returns pooled features).
        embed_dim: token width.
        depth: number of encoder blocks.
        num_heads: attention heads per block (``embed_dim`` must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: bias on the query/key/value projection.
        drop_rate: dropout after the position embedding, in the blocks' projections and before the head.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (rising linearly from 0 in the first).
        patch_drop_rate: share of the patch tokens left out of each training image (a random subset per image,
            prefix tokens kept; FLIP, Li et al. 2023): cheaper training steps; evaluation sees every token. Only
            ``forward_features`` / ``forward`` drop (dense tasks need the whole grid); not with ``window_size``.
        global_pool: ``"token"`` (class token), ``"avg"`` (mean of the patch tokens), ``"map"`` (attention
            pooling with a learned query, SigLIP) or ``""`` (no pooling: the head sees every token).
        class_token: prepend a learned class token.
        distilled: DeiT's distillation token and second head.
        fc_norm: normalise after pooling instead of before (``None``: timm's rule, on for ``avg`` pooling).
        norm_eps: LayerNorm epsilon.
        dynamic_img_size: resample the position embeddings for any input size on every call.
        init_values: LayerScale: each block's attention and MLP outputs are scaled by a learned per-channel
            gamma starting at this value (DINOv2 1e-5, DeiT III 1e-6); ``None`` = no LayerScale.
        reg_tokens: learned register tokens after the class token (DINOv2 with registers: 4).
        no_embed_class: the position table covers the patches only; prefix tokens get none (DeiT III, DINOv2
            with registers).
        pre_norm: a LayerNorm after the position embedding and no patch-embedding bias (CLIP).
        final_norm: the final LayerNorm (or ``fc_norm``) at all.
        act_layer: MLP activation: ``"gelu"``, ``"gelu_tanh"`` (SigLIP), ``"quick_gelu"`` (OpenAI CLIP),
            ``"silu"``.
        mlp_layer: ``"mlp"`` or ``"swiglu"`` (packed SwiGLU, DINOv2 giant; the hidden width is split in two).
        embed_layer: ``"conv"`` (the ViT patch projection), ``"spt"`` (Shifted Patch Tokenization, for small
            datasets; Lee et al. 2021) or ``"conv_stem"`` (3x3 stride-2 convolutions with BatchNorm and ReLU, then a
            1x1 projection; Xiao et al. 2021; the patch size must be a power of 2).
        attn_layer: ``"mha"`` or ``"lsa"`` (Locality Self-Attention: learned temperature, no self-attention to
            the token itself; Lee et al. 2021).
        window_size: ViTDet windowed attention (Li et al. 2022): blocks not in ``global_attn_indexes`` attend
            within non-overlapping ``window_size`` x ``window_size`` windows of the patch grid (padded to a
            multiple); prefix tokens attend globally and join every window. 0 = off (every block global).
        global_attn_indexes: indices of the blocks that keep global attention when ``window_size`` is on
            (ViTDet-B: 2, 5, 8, 11).

    Example:
        >>> config = ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        >>> config.grid_size, config.replace(img_size=64).grid_size
        ((4, 4), (8, 8))
        >>> ViTConfig(embed_dim=63, num_heads=2)
        Traceback (most recent call last):
        ...
        ValueError: invalid VisionTransformer configuration:
          embed_dim 63 is not divisible by num_heads 2
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patch_drop_rate: float = 0.0
    global_pool: str = "token"
    class_token: bool = True
    distilled: bool = False
    fc_norm: bool | None = None
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    init_values: float | None = None
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    embed_layer: str = "conv"
    attn_layer: str = "mha"
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"invalid VisionTransformer configuration:\n  img_size: expected an int or "
                                 f"(height, width), got {list(size)}")
            size = (size[0], size[1]) if size[0] != size[1] else size[0]
        object.__setattr__(self, "img_size", size)  # one spelling per size, so equal configs compare equal
        if isinstance(self.global_attn_indexes, (list, tuple)):  # JSON gives a list
            object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
        problems = _problems(self)
        if problems:
            raise ValueError("invalid VisionTransformer configuration:\n  " + "\n  ".join(problems))

    # ---- derived sizes ----------------------------------------------------------------------------
    @property
    def image_hw(self) -> tuple[int, int]:
        """``img_size`` as (height, width)."""
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per column and per row."""
        height, width = self.image_hw
        return height // self.patch_size, width // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class token, register tokens, distillation token."""
        return int(self.class_token) + self.reg_tokens + int(self.distilled)

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a row in the position table (none with ``no_embed_class``)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def uses_fc_norm(self) -> bool:
        """Whether the final norm comes after pooling (``fc_norm``) rather than before it (``norm``)."""
        if not self.final_norm:
            return False
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    # ---- conversions ------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with ``changes`` applied (and checked); unknown names raise ``TypeError`` naming them."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise TypeError(f"unknown ViTConfig field(s): {', '.join(unknown)}; known: {', '.join(field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self, training: bool = True) -> dict[str, Any]:
        """JSON-ready fields (``img_size`` a list when not square); ``training=False`` leaves out dropout rates."""
        values = dataclasses.asdict(self)
        if isinstance(values["img_size"], tuple):
            values["img_size"] = list(values["img_size"])
        values["global_attn_indexes"] = list(values["global_attn_indexes"])
        if not training:
            for key in TRAINING_FIELDS:
                values.pop(key)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ViTConfig":
        """The inverse of ``to_dict``; unknown keys raise ``TypeError`` naming them."""
        return cls().replace(**dict(values))


def field_names() -> tuple[str, ...]:
    """Every architecture option, in declaration order.

    Example:
        >>> field_names()[:3]
        ('img_size', 'patch_size', 'in_chans')
    """
    return tuple(f.name for f in dataclasses.fields(ViTConfig))


def mlp_hidden(config: ViTConfig) -> int:
    """Hidden width of each block's MLP (rounded: a ratio read back from weights, 8192 / 1536, is inexact)."""
    return int(round(config.embed_dim * config.mlp_ratio))


def _problems(config: ViTConfig) -> list[str]:
    """Every impossible value, each naming its field, so one error lists them all."""
    problems = []
    for key in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key}: expected a positive integer, got {value!r}")
    if isinstance(config.num_classes, bool) or not isinstance(config.num_classes, int) or config.num_classes < 0:
        problems.append(f"num_classes: expected an integer >= 0 (0 = no head), got {config.num_classes!r}")
    height, width = config.image_hw
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in (height, width)):
        problems.append(f"img_size: expected positive integer sizes, got {config.img_size!r}")
    elif isinstance(config.patch_size, int) and config.patch_size > 0 and (height % config.patch_size
                                                                           or width % config.patch_size):
        problems.append(f"img_size {height}x{width} is not divisible by patch_size {config.patch_size}")
    if (isinstance(config.num_heads, int) and config.num_heads > 0 and isinstance(config.embed_dim, int)
            and config.embed_dim % config.num_heads):
        problems.append(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
    if not config.mlp_ratio > 0:
        problems.append(f"mlp_ratio: expected > 0, got {config.mlp_ratio}")
    for key in TRAINING_FIELDS:
        value = getattr(config, key)
        if not (0.0 <= value < 1.0) or math.isnan(value):
            problems.append(f"{key}: expected a rate in [0, 1), got {value}")
    if not config.norm_eps > 0:
        problems.append(f"norm_eps: expected > 0, got {config.norm_eps}")
    if config.global_pool not in GLOBAL_POOLS:
        problems.append(f"global_pool: expected one of {', '.join(map(repr, GLOBAL_POOLS))}, "
                        f"got {config.global_pool!r}")
    if config.global_pool == "token" and not config.class_token:
        problems.append("global_pool='token' needs class_token=True (use global_pool='avg' without a class token)")
    if config.distilled and not config.class_token:
        problems.append("distilled=True needs class_token=True")
    if isinstance(config.reg_tokens, bool) or not isinstance(config.reg_tokens, int) or config.reg_tokens < 0:
        problems.append(f"reg_tokens: expected an integer >= 0, got {config.reg_tokens!r}")
    elif config.reg_tokens and config.distilled:
        problems.append("reg_tokens and distilled cannot be combined (no released model has both)")
    if config.init_values is not None and not config.init_values > 0:
        problems.append(f"init_values: expected > 0 or None (no LayerScale), got {config.init_values}")
    if config.act_layer not in ACT_LAYERS:
        problems.append(f"act_layer: expected one of {', '.join(ACT_LAYERS)}, got {config.act_layer!r}")
    if config.mlp_layer not in MLP_LAYERS:
        problems.append(f"mlp_layer: expected one of {', '.join(MLP_LAYERS)}, got {config.mlp_layer!r}")
    if config.embed_layer not in EMBED_LAYERS:
        problems.append(f"embed_layer: expected one of {', '.join(EMBED_LAYERS)}, got {config.embed_layer!r}")
    if config.attn_layer not in ATTN_LAYERS:
        problems.append(f"attn_layer: expected one of {', '.join(ATTN_LAYERS)}, got {config.attn_layer!r}")
    if config.embed_layer in ("spt", "conv_stem") and config.pre_norm:
        problems.append(f"embed_layer {config.embed_layer!r} has no patch-projection bias to drop: it cannot be "
                        f"combined with pre_norm")
    if config.embed_layer == "conv_stem" and isinstance(config.patch_size, int):
        size = config.patch_size
        if size < 2 or size & (size - 1):
            problems.append(f"embed_layer 'conv_stem' halves the image per stage: patch_size must be a power of 2 "
                            f"(2, 4, 8, 16), got {size}")
        elif isinstance(config.embed_dim, int) and config.embed_dim % (size // 2):
            problems.append(f"embed_layer 'conv_stem' doubles its width per stage up to embed_dim: embed_dim must "
                            f"be divisible by patch_size / 2 = {size // 2}, got {config.embed_dim}")
    if config.mlp_layer == "swiglu" and isinstance(config.embed_dim, int) and mlp_hidden(config) % 2:
        problems.append(f"mlp_layer 'swiglu' splits the MLP's hidden width in two: embed_dim x mlp_ratio = "
                        f"{mlp_hidden(config)} must be even")
    problems.extend(_window_problems(config))
    return problems


def _window_problems(config: ViTConfig) -> list[str]:
    problems = []
    window, indexes = config.window_size, config.global_attn_indexes
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        problems.append(f"window_size: expected an integer >= 0 (0 = global attention everywhere), got {window!r}")
    elif window and config.attn_layer != "mha":
        problems.append(f"window_size: windowed attention needs attn_layer 'mha', got {config.attn_layer!r}")
    elif window and config.patch_drop_rate:
        problems.append(f"patch_drop_rate: windowed attention needs the whole patch grid, got patch_drop_rate "
                        f"{config.patch_drop_rate} with window_size {window}")
    depth = config.depth if isinstance(config.depth, int) and not isinstance(config.depth, bool) else 0
    if not isinstance(indexes, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
        problems.append(f"global_attn_indexes: expected a list of block indices, got {indexes!r}")
    elif any(not 0 <= i < depth for i in indexes) or len(set(indexes)) != len(indexes):
        problems.append(f"global_attn_indexes: expected distinct block indices in 0..{depth - 1} (depth {depth}), "
                        f"got {list(indexes)}")
    return problems
