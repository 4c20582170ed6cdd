"""Segmentation heads on a ViT's patch maps (``forward_intermediates``, NCHW; class and register tokens left out),
the model that pads, normalises and crops around them, and sliding-window inference.

    linear      BatchNorm + 1x1 conv on the last block's map, upsampled bilinearly (DINOv2's linear protocol)
    linear_ms   the same on the concatenation of 4 evenly spaced blocks' maps (DINOv2's "+ms" head)
    dpt         a small DPT decoder (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"): the 4 blocks'
                maps reassembled at strides p/4, p/2, p, 2p and fused coarse-to-fine with residual convolutions

Why DPT for the decoder: a ViT's maps are all at one stride (the patch), so a head that only classifies patches
(linear, or Segmenter's mask transformer, whose masks are also patch-sized) cannot draw a boundary finer than a
patch. DPT's reassembly gives learned maps at finer strides from several depths, fused convolutionally, which is the
spatial detail full fine-tuning can learn; it needs no pyramid from the backbone and stays a few convolutions deep.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vision import VisionTransformer
from .pyramid import pad_to_multiple

HEADS = ("linear", "linear_ms", "dpt")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """``count`` block indices spread over ``depth`` blocks, ending with the last (fewer when depth < count).

    Example:
        >>> evenly_spaced_blocks(12), evenly_spaced_blocks(24), evenly_spaced_blocks(2)
        ([2, 5, 8, 11], [5, 11, 17, 23], [0, 1])
    """
    return sorted({max(0, depth - 1 - round(k * depth / count)) for k in range(count)})


class LinearHead(nn.Module):
    """BatchNorm + 1x1 convolution on the channel concatenation of the given maps (DINOv2's linear and +ms heads).

    Args:
        in_channels: channels of one map (the ViT's embed_dim).
        num_maps: how many maps are concatenated (1: linear, 4: linear_ms).
        num_classes: output classes.
    """

    def __init__(self, in_channels: int, num_maps: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels * num_maps)
        self.classifier = nn.Conv2d(in_channels * num_maps, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.norm(torch.cat(list(maps), dim=1)))  # (B, K, H/p, W/p)


class _ResidualConv(nn.Module):
    """DPT's residual convolution unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _reassemble(embed_dim: int, channels: int, scale: float) -> nn.Sequential:
    """A patch map projected to ``channels`` and resampled by ``scale`` (4, 2, 1 or 0.5) as DPT's reassemble stage."""
    resample = {4.0: nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=4),
                2.0: nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
                1.0: nn.Identity(),
                0.5: nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)}[scale]
    return nn.Sequential(nn.Conv2d(embed_dim, channels, kernel_size=1), resample)


class DPTHead(nn.Module):
    """A small DPT decoder: four maps (shallow to deep) reassembled at 4x, 2x, 1x and 0.5x the patch grid, fused from
    the coarsest up (upsample to the next map's size, add its residual-refined map, refine again), then a 3x3 conv +
    BatchNorm + ReLU and a 1x1 classifier at 4x the patch grid.

    Args:
        embed_dim: channels of the ViT's maps.
        num_maps: how many distinct maps the ViT gives (1-4; with fewer than 4 the deepest are reused).
        num_classes: output classes.
        channels: width of the decoder.
    """

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, embed_dim: int, num_maps: int, num_classes: int, channels: int = 128):
        super().__init__()
        # which of the given maps feeds each stage: spread shallow (fine stage) to deep (coarse stage)
        self.sources = [round(k * (num_maps - 1) / 3) for k in range(4)]
        self.reassemble = nn.ModuleList(_reassemble(embed_dim, channels, s) for s in self.SCALES)
        self.skip = nn.ModuleList(_ResidualConv(channels) for _ in self.SCALES)
        self.refine = nn.ModuleList(_ResidualConv(channels) for _ in self.SCALES)
        self.classifier = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                                        nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                        nn.Conv2d(channels, num_classes, kernel_size=1))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        stages = [layer(maps[j]) for layer, j in zip(self.reassemble, self.sources)]  # finest (4x) first
        x = self.refine[3](self.skip[3](stages[3]))
        for i in (2, 1, 0):
            x = F.interpolate(x, size=stages[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.refine[i](x + self.skip[i](stages[i]))
        return self.classifier(x)  # (B, K, 4H/p, 4W/p)


class SegmentationModel(nn.Module):
    """A ViT and a segmentation head: images (B, C, H, W) in [0, 1] -> logits (B, K, H, W) at the image's size.

    Normalises with ``mean``/``std`` (the one place it happens), pads the bottom/right to a multiple of the patch
    size, takes the head's blocks from ``forward_intermediates`` (final norm applied), upsamples the head's logits
    bilinearly to the padded size and crops them back to the image. Build the ViT with ``dynamic_img_size=True`` to
    take any image size.

    Args:
        vit: the backbone (its classification head is not used).
        num_classes: output classes.
        head: "linear", "linear_ms" or "dpt".
        channels: width of the dpt decoder.
        mean: per-channel mean subtracted from the [0, 1] input (None: the ViT's pretrained_cfg, else ImageNet's).
        std: per-channel std the input is divided by (as ``mean``).

    Example:
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
        ...                         dynamic_img_size=True)
        >>> model = SegmentationModel(vit, num_classes=5, head="dpt", channels=16).eval()
        >>> tuple(model(torch.rand(2, 3, 27, 35)).shape)
        (2, 5, 27, 35)
    """

    def __init__(self, vit: VisionTransformer, num_classes: int, head: str = "linear", channels: int = 128,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"model.head: expected one of {', '.join(HEADS)}, got {head!r}")
        self.vit = vit
        depth, dim = len(vit.blocks), vit.embed_dim
        self.blocks = [depth - 1] if head == "linear" else evenly_spaced_blocks(depth)
        self.head = (DPTHead(dim, len(self.blocks), num_classes, channels) if head == "dpt"
                     else LinearHead(dim, len(self.blocks), num_classes))
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean = mean or cfg.get("mean") or IMAGENET_MEAN
        std = std or cfg.get("std") or IMAGENET_STD
        channels_in = vit.in_chans
        self.register_buffer("mean", _per_channel(mean, channels_in), persistent=False)
        self.register_buffer("std", _per_channel(std, channels_in), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        x = pad_to_multiple((images - self.mean) / self.std, self.vit.patch_size)  # zeros: the mean colour
        maps = self.vit.forward_intermediates(x, indices=self.blocks, norm=True, intermediates_only=True)
        logits = F.interpolate(self.head(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def _per_channel(values: Sequence[float], channels: int) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) != channels:
        values = values * channels if len(values) == 1 else [sum(values) / len(values)] * channels
    return torch.tensor(values).view(1, channels, 1, 1)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) offsets of windows covering ``size`` pixels: every ``stride``, the last flush with the end.

    Example:
        >>> window_starts(100, 64, 32), window_starts(50, 64, 32)
        ([0, 32, 36], [0])
    """
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: int,
                   stride: int) -> torch.Tensor:
    """Logits for ``images`` (B, C, H, W) from ``predict`` run on ``window``-sized crops every ``stride`` pixels,
    averaged where crops overlap (mmsegmentation's ``slide`` mode). A window covering the image is one call.

    Example:
        >>> double = lambda x: x[:, :1] * 2
        >>> bool(torch.equal(sliding_window(double, torch.ones(1, 3, 10, 7), 4, 3), torch.full((1, 1, 10, 7), 2.0)))
        True
    """
    height, width = images.shape[-2:]
    rows, cols = window_starts(height, window, stride), window_starts(width, window, stride)
    if len(rows) == 1 and len(cols) == 1:
        return predict(images)
    total, count = None, images.new_zeros(1, 1, height, width)
    for top in rows:
        for left in cols:
            crop = (slice(None), slice(None), slice(top, top + window), slice(left, left + window))
            logits = predict(images[crop])
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[crop] += logits
            count[crop] += 1
    return total / count
