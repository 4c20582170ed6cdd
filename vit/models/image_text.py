"""An image tower and a text tower projecting into one space: CLIP (softmax over the batch) and SigLIP (a sigmoid
per pair, with ``logit_bias``). The contract is open_clip's: ``encode_image``, ``encode_text``, ``tokenizer``,
``forward -> (image_features, text_features, logit_scale.exp())``."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .text import TextConfig, TextTransformer
from .vision import VisionTransformer

Tokenizer = Callable[[str | Sequence[str]], torch.Tensor]


class ImageTextModel(nn.Module):
    """A ``VisionTransformer`` (its head is the image projection, or none for SigLIP) and a ``TextTransformer``.

    Args:
        visual: the image tower, or its ``ViTConfig``; its outputs (``num_classes`` wide, or ``embed_dim`` without a
            head) must have the text tower's ``output_dim``.
        text: the text tower, or its ``TextConfig``.
        init_logit_scale: log of the starting temperature (CLIP: log(1/0.07); SigLIP: log(10)).
        init_logit_bias: SigLIP's learned bias on every logit (-10 in the paper); None = no bias (CLIP).
        tokenizer: texts -> (B, context_length) ids; ``load_image_text`` sets the checkpoint's own.

    Example:
        >>> model = ImageTextModel(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        ...                                  num_classes=16, pre_norm=True),
        ...                        TextConfig(context_length=8, vocab_size=100, embed_dim=32, depth=1, num_heads=2,
        ...                                   proj_dim=16))
        >>> images, texts = torch.zeros(2, 3, 32, 32), torch.tensor([[1, 7, 99, 0, 0, 0, 0, 0]] * 3)
        >>> image_features, text_features, scale = model(images, texts)
        >>> image_features.shape, text_features.shape, round(scale.item(), 2)
        (torch.Size([2, 16]), torch.Size([3, 16]), 14.29)
    """

    def __init__(self, visual: VisionTransformer | ViTConfig, text: TextTransformer | TextConfig,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float | None = None,
                 tokenizer: Tokenizer | None = None):
        super().__init__()
        self.visual = visual if isinstance(visual, VisionTransformer) else VisionTransformer(visual)
        self.text = text if isinstance(text, TextTransformer) else TextTransformer(text)
        image_dim = self.visual.num_classes or self.visual.embed_dim
        if image_dim != self.text.output_dim:
            raise ValueError(f"ImageTextModel: the image tower gives {image_dim}-d features, the text tower "
                             f"{self.text.output_dim}-d; the two must project into one space (set the image "
                             f"tower's num_classes or the text tower's proj_dim)")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        self.tokenizer = tokenizer
        self.embed_dim = image_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim) image features in the joint space."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim) text features in the joint space."""
        features = self.text(token_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """``self.tokenizer(texts)``, with a clear error when the model was built without one."""
        if self.tokenizer is None:
            raise RuntimeError("this ImageTextModel has no tokenizer: load it with vit.load_image_text, or set "
                               "model.tokenizer (a callable texts -> LongTensor (B, context_length))")
        return self.tokenizer(texts)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised image features (B, E), normalised text features (T, E), ``logit_scale.exp()``)."""
        return (self.encode_image(images, normalize=True), self.encode_text(token_ids, normalize=True),
                self.logit_scale.exp())

    def logits(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B, T), logits_per_text (T, B)): scaled cosine similarities, plus ``logit_bias``
        where there is one (SigLIP; its probabilities are ``sigmoid(logits)``, CLIP's a softmax over texts)."""
        image_features, text_features, scale = self(images, token_ids)
        logits = scale * image_features @ text_features.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def no_weight_decay(self) -> set[str]:
        """Both towers' no-decay names (prefixed), the temperature and the bias."""
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        names |= {n for n in ("logit_scale", "logit_bias") if getattr(self, n) is not None}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, logit_bias={self.logit_bias is not None}"


def image_text_config(model: ImageTextModel) -> dict[str, Any]:
    """The whole architecture as plain data: ``{"vision": ViTConfig dict, "text": TextConfig dict, "logit_bias":
    bool}``: what a Lightning module's hyper-parameters or a saved image-text checkpoint record to rebuild the model
    with ``ImageTextModel(ViTConfig.from_dict(d["vision"]), TextConfig.from_dict(d["text"]), ...)``.

    Example:
        >>> m = ImageTextModel(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
        ...                              class_token=False, global_pool="map"),
        ...                    TextConfig(context_length=8, vocab_size=50, embed_dim=32, depth=1, num_heads=2,
        ...                               proj_dim=32, causal=False, pool="last"), init_logit_bias=-10.0)
        >>> d = image_text_config(m)
        >>> d["text"]["pool"], d["vision"]["global_pool"], d["logit_bias"]
        ('last', 'map', True)
    """
    return {"vision": model.visual.config.to_dict(training=False), "text": model.text.config.to_dict(),
            "logit_bias": model.logit_bias is not None}
