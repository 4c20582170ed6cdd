"""ViTDet's simple feature pyramid (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection") on our VisionTransformer.

The last block's patch tokens, a single map at stride = patch size, become maps at strides patch/4, patch/2,
patch and 2*patch (two 2x2 transposed convolutions, one, none, a 2x2 max-pool), each then projected to
``out_channels`` by a 1x1 and a 3x3 convolution with channel LayerNorms. No lateral or top-down connections:
the paper's point is that a plain ViT's last map is enough.

    image (B, 3, H, W) -> ViT -> (B, D, H/p, W/p) -> p2 (p/4) · p3 (p/2) · p4 (p) · p5 (2p) [· pool (4p)]

RetinaNet and FCOS read levels 3 to 7 instead: scale factors (2, 1, 0.5) and torchvision's ``LastLevelP6P7`` on
top (two stride-2 3x3 convolutions), as ViTDet's RetinaNet does.

The pyramid is a torchvision detection backbone (``out_channels`` and an ``OrderedDict`` of named maps) and
describes itself with a ``PyramidSpec`` (names, strides, channels, padding needs) that necks and heads read,
so no stride or channel count is repeated in a config.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..models.vision import VisionTransformer

EXTRA_LEVEL = "pool"  # torchvision's name for the extra max-pooled level (LastLevelMaxPool): proposals only
TOP_BLOCKS = ("pool", "p6p7", None)


@dataclass(frozen=True)
class PyramidSpec:
    """What a pyramid gives: one entry per map, finest first.

    Args:
        names: map names, in the order of ``forward``'s OrderedDict (``"p2"`` ... and ``"pool"`` if present).
        strides: pixels of the (padded) input per map cell, one per name (fractional for patch sizes that are
            not a multiple of 4, e.g. 3.5 for patch 14).
        channels: channels of every map (torchvision's heads need one number for all levels).
        patch_size: the ViT's patch size (the stride of its own token map).
        num_prefix_tokens: class / register / distillation tokens the ViT puts before its patch tokens (dropped).
        size_divisibility: pad inputs to a multiple of this (the coarsest stride) so every map's cells line up
            exactly with the input's pixels.
        extra_levels: names of maps derived for proposals only (not pooled by RoI heads).

    Example:
        >>> spec = PyramidSpec(("p2", "p3"), (4, 8), 256, 16, 1, 8)
        >>> spec.stride("p3"), spec.power_of_two
        (8, True)
    """

    names: tuple[str, ...]
    strides: tuple[float, ...]
    channels: int
    patch_size: int
    num_prefix_tokens: int
    size_divisibility: int
    extra_levels: tuple[str, ...] = ()

    def stride(self, name: str) -> float:
        """The stride of the map called ``name``."""
        return self.strides[self.names.index(name)]

    @property
    def roi_names(self) -> tuple[str, ...]:
        """The maps RoI heads pool from (all but the extra levels)."""
        return tuple(n for n in self.names if n not in self.extra_levels)

    @property
    def power_of_two(self) -> bool:
        """Whether every stride is an integer power of two (what torchvision's ``MultiScaleRoIAlign`` assumes)."""
        return all(float(s).is_integer() and int(s) > 0 and int(s) & (int(s) - 1) == 0 for s in self.strides)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a ``VisionTransformer``: a torchvision-style detection backbone.

    Inputs whose height or width is not a multiple of the patch size are zero-padded at the bottom/right (the
    maps then cover the padded input). The ViT must accept the padded size: build it at the detection input size,
    or with ``dynamic_img_size=True`` (``ObjectDetector`` does both).

    Args:
        vit: the backbone, usually ``Backbone.build(num_classes=0)``; its head is not used.
        out_channels: channels of every output map.
        scale_factors: each map's size relative to the ViT's token map (4 = stride patch/4); powers of two only.
        top_block: extra coarser levels from the coarsest map, torchvision's extra FPN blocks: ``"pool"``
            (``LastLevelMaxPool``: one stride-2 subsampling, named ``"pool"``, for Faster R-CNN's region
            proposals), ``"p6p7"`` (``LastLevelP6P7``: two stride-2 3x3 convolutions, for RetinaNet / FCOS) or
            None.
        norm: apply the ViT's final LayerNorm to the token map first.

    Example:
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
        >>> pyramid = SimpleFeaturePyramid(vit, out_channels=16)
        >>> {k: tuple(v.shape) for k, v in pyramid(torch.zeros(1, 3, 32, 32)).items()}
        {'p1': (1, 16, 16, 16), 'p2': (1, 16, 8, 8), 'p3': (1, 16, 4, 4), 'p4': (1, 16, 2, 2), 'pool': (1, 16, 1, 1)}
        >>> pyramid.spec.strides, pyramid.spec.size_divisibility
        ((2, 4, 8, 16, 32), 32)
    """

    def __init__(self, vit: VisionTransformer, out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), top_block: str | None = "pool",
                 norm: bool = True):
        super().__init__()
        scale_factors = tuple(float(s) for s in scale_factors)
        problems = []
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            problems.append(f"out_channels: expected a positive integer, got {out_channels!r}")
        if not scale_factors or any(s not in _STAGES for s in scale_factors):
            problems.append(f"scale_factors: expected some of {sorted(_STAGES, reverse=True)}, got {list(scale_factors)}")
        elif list(scale_factors) != sorted(set(scale_factors), reverse=True):
            problems.append(f"scale_factors: expected distinct values, largest (finest map) first, "
                            f"got {list(scale_factors)}")
        if top_block not in TOP_BLOCKS:
            problems.append(f"top_block: expected one of {', '.join(map(repr, TOP_BLOCKS))}, got {top_block!r}")
        if problems:
            raise ValueError("invalid feature pyramid:\n  " + "\n  ".join(problems))
        self.vit = vit
        self.out_channels = out_channels
        self.norm = norm
        patch, dim = vit.patch_size, vit.embed_dim
        strides = [_exact(patch / s) for s in scale_factors]
        names = [f"p{round(math.log2(s))}" for s in strides]
        self.stages = nn.ModuleDict({name: nn.Sequential(*_STAGES[s](dim), *_projection(_width(dim, s), out_channels))
                                     for name, s in zip(names, scale_factors)})
        extra = []
        if top_block == "pool":
            extra = [EXTRA_LEVEL]
            strides.append(_exact(strides[-1] * 2))
        elif top_block == "p6p7":
            strides += [_exact(strides[-1] * 2), _exact(strides[-1] * 4)]
            extra = [f"p{round(math.log2(s))}" for s in strides[-2:]]
        names += extra
        # torchvision's own extra blocks; their names are replaced by ours (p6/p7 are only right for patch 16)
        self.top_block = (LastLevelMaxPool() if top_block == "pool" else
                          LastLevelP6P7(out_channels, out_channels) if top_block == "p6p7" else None)
        coarsest = max(strides)
        self.spec = PyramidSpec(names=tuple(names), strides=tuple(strides), channels=out_channels, patch_size=patch,
                                num_prefix_tokens=vit.num_prefix_tokens,
                                # a multiple of the patch too, so padding never splits a patch
                                size_divisibility=math.lcm(int(math.ceil(coarsest)), patch),
                                extra_levels=tuple(extra))

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C, H, W) -> {name: (B, out_channels, H_padded / stride, W_padded / stride)}, finest first."""
        images = pad_to_multiple(images, self.patch_size)
        # the last block's patch tokens as a map, prefix tokens dropped: (B, D, H/p, W/p)
        (tokens,) = self.vit.forward_intermediates(images, indices=1, norm=self.norm, intermediates_only=True)
        maps = [stage(tokens) for stage in self.stages.values()]
        if self.top_block is not None:
            maps, _ = self.top_block(maps, maps, [])
        return OrderedDict(zip(self.spec.names, maps))

    # ---- optimiser helpers (the same contracts as VisionTransformer's) ----------------------------
    def no_weight_decay(self) -> set[str]:
        """The ViT's no-decay names (position embeddings, tokens, norms, biases) and the pyramid's norms/biases."""
        names = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        for part in ("stages", "top_block"):
            if getattr(self, part) is not None:
                names |= {f"{part}.{n}" for n in norm_and_bias_names(getattr(self, part))}
        return names

    def layer_ids(self, coarse: bool = False) -> dict[str, int]:
        """Depth of every parameter for layer-wise LR decay: the ViT's, and the pyramid after the ViT's last."""
        ids = {f"vit.{n}": i for n, i in self.vit.layer_ids(coarse).items()}
        top = max(ids.values(), default=0) + 1
        return {**ids, **{n: top for n, _ in self.named_parameters() if not n.startswith("vit.")}}


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right up to multiples of ``multiple``; unchanged if already.

    Example:
        >>> pad_to_multiple(torch.ones(1, 3, 30, 17), 8).shape
        torch.Size([1, 3, 32, 24])
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h))


def norm_and_bias_names(module: nn.Module) -> set[str]:
    """Parameters that take no weight decay in a plain module: every bias and every normalisation parameter."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d)
    names = set()
    for module_name, child in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in child.named_parameters(recurse=False):
            if isinstance(child, norms) or name == "bias":
                names.add(prefix + name)
    return names


# ---- the four rescaling stages (detectron2's SimpleFeaturePyramid, written out) ---------------------------
def _up4(dim: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2)]


def _up2(dim: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)]


def _same(dim: int) -> list[nn.Module]:
    return []


def _down2(dim: int) -> list[nn.Module]:
    # ceil_mode: an odd token grid (an input padded only to the patch size) keeps its last row and column
    return [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)]


_STAGES = {4.0: _up4, 2.0: _up2, 1.0: _same, 0.5: _down2}


def _width(dim: int, scale: float) -> int:
    return dim // 4 if scale == 4.0 else dim // 2 if scale == 2.0 else dim


def _projection(in_channels: int, out_channels: int) -> list[nn.Module]:
    # no conv biases: a LayerNorm follows each convolution
    return [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_channels)]


def _exact(value: float) -> float:
    return int(value) if float(value).is_integer() else value
