"""The Vision Transformer: PatchEmbed -> [cls] + pos -> Block x depth -> norm -> head. No Lightning, no I/O."""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import to_2tuple, trunc_normal_
from timm.models import group_parameters
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block, PatchEmbed
from .pos_embed import resample_pos_embed


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) / DeiT (Touvron et al. 2021) with timm's parameter names.

    Args:
        img_size: input image size, an int for square images or (height, width); divisible by patch_size.
        patch_size: side of the square patches the image is cut into (one token per patch).
        in_chans: number of input image channels.
        num_classes: outputs of the linear head; 0 = no head (the model returns the pooled features).
        embed_dim: token width (the transformer's hidden size); divisible by num_heads.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of each block's MLP as a multiple of embed_dim.
        qkv_bias: give the query/key/value projection a bias.
        drop_rate: dropout after the position embeddings, on each block's attention and MLP output, before the head.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first block.
        global_pool: what the head reads: "token" (the class token) or "avg" (the mean of the patch tokens).
        class_token: prepend a learned class token (required by global_pool "token" and by distilled).
        distilled: add DeiT's distillation token and second head; logits are the mean of both heads.
        fc_norm: final LayerNorm after pooling instead of on all tokens; None = only for global_pool "avg" (timm).
        norm_eps: epsilon of every LayerNorm.
        dynamic_img_size: accept any input size divisible by patch_size, resampling position embeddings per call.

    Example:
        >>> model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=2)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "token",
                 class_token: bool = True, distilled: bool = False, fc_norm: bool | None = None,
                 norm_eps: float = 1e-6, dynamic_img_size: bool = False):
        super().__init__()
        img_size = to_2tuple(img_size)
        _validate(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                  embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
                  attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, global_pool=global_pool,
                  class_token=class_token, distilled=distilled)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool
        self.distilled = distilled
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.grad_checkpointing = False
        # timm's rule: average pooling normalises after pooling (fc_norm) instead of before (norm).
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=drop_path[i], norm_eps=norm_eps)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """ViT/timm reference: trunc-normal(0.02) for position embeddings and linear weights, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(_init_module)

    # ---- forward ----------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos_embed = resample_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)  # (B, N, D) -> (B, prefix + N, D)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, C, H, W) -> (B, prefix + N, D)."""
        grid = self._check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x, grid)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the class token, or the mean of the patch tokens."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from ``forward_features`` -> logits (or the pooled features when ``pre_logits``)."""
        features = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits:
            return features
        if self.head_dist is not None:
            # DeiT distilled inference: average of the class-token and distillation-token heads.
            return (self.head(features) + self.head_dist(self.head_drop(self.fc_norm(x[:, 1])))) / 2
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, each (B, heads, N, N); computed on request, not in ``forward``."""
        grid = self._check_input(x)
        x = self._pos_embed(self.patch_embed(x), grid)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_map(block.norm1(x)))
            x = block(x)
        return maps

    # ---- timm-style utilities ---------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (and the distillation head) with a fresh one for ``num_classes`` (0 = none)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool: expected 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        where = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **where) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_module)
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.embed_dim, num_classes, **where) if num_classes > 0 else nn.Identity()
            self.head_dist.apply(_init_module)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: embeddings/tokens, norms and biases."""
        names = {"pos_embed", "cls_token", "dist_token"}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, nn.LayerNorm):
                names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
            elif getattr(module, "bias", None) is not None:
                names.add(prefix + "bias")
        return {n for n, _ in self.named_parameters() if n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's contract: regexes that ``timm.models.group_parameters`` (and so ``timm.optim``'s layer-wise
        LR decay) turn into layer groups: embeddings and tokens first, then one group per block, then the rest."""
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed|norm_pre", blocks=blocks)

    def layer_ids(self, coarse: bool = False) -> dict[str, int]:
        """Depth of every parameter, read from ``group_matcher`` exactly as timm's layer-wise LR decay reads it:
        embeddings and tokens 0, block i -> i + 1, the final norm with the last block (``coarse``: after it,
        with the head), then everything else (head, fc_norm).

        Example:
            >>> m = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
            >>> ids = m.layer_ids(); ids["pos_embed"], ids["blocks.1.mlp.fc1.weight"], ids["norm.weight"], ids["head.weight"]
            (0, 2, 2, 3)
        """
        return group_parameters(self, self.group_matcher(coarse), reverse=True)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"VisionTransformer expects input of shape (B, {self.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        patch = self.patch_embed.patch_size
        if (height, width) != self.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"VisionTransformer expects {self.img_size[0]}x{self.img_size[1]} images, got {height}x{width}. "
                f"Resize the input, build the model with img_size=({height}, {width}) "
                f"(load_pretrained(..., img_size=...) resamples the position embeddings), "
                f"or pass dynamic_img_size=True to resample them on every call.")
        if height % patch[0] or width % patch[1]:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch[0]}")
        return height // patch[0], width // patch[1]


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _validate(*, img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, drop_rate,
              attn_drop_rate, drop_path_rate, global_pool, class_token, distilled) -> None:
    """Reject impossible architectures with a message that names the argument, before any weight exists."""
    problems = []
    for key, value in (("patch_size", patch_size), ("in_chans", in_chans), ("embed_dim", embed_dim),
                       ("depth", depth), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}: expected a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        problems.append(f"num_classes: expected an integer >= 0 (0 = no head), got {num_classes!r}")
    if isinstance(patch_size, int) and patch_size > 0 and any(s % patch_size for s in img_size):
        problems.append(f"img_size {img_size[0]}x{img_size[1]} is not divisible by patch_size {patch_size}")
    if any(s < 1 for s in img_size):
        problems.append(f"img_size: expected positive sizes, got {img_size}")
    if isinstance(num_heads, int) and num_heads > 0 and isinstance(embed_dim, int) and embed_dim % num_heads:
        problems.append(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if not mlp_ratio > 0:
        problems.append(f"mlp_ratio: expected > 0, got {mlp_ratio}")
    for key, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                       ("drop_path_rate", drop_path_rate)):
        if not (0.0 <= value < 1.0) or math.isnan(value):
            problems.append(f"{key}: expected a rate in [0, 1), got {value}")
    if global_pool not in ("token", "avg"):
        problems.append(f"global_pool: expected 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and not class_token:
        problems.append("global_pool='token' needs class_token=True (use global_pool='avg' without a class token)")
    if distilled and not class_token:
        problems.append("distilled=True needs class_token=True")
    if problems:
        raise ValueError("invalid VisionTransformer configuration:\n  " + "\n  ".join(problems))
