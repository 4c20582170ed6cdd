"""The Vision Transformer: PatchEmbed -> [cls] + pos -> Block x depth -> norm -> head. No Lightning, no I/O."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.layers import trunc_normal_
from timm.models import group_parameters
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .layers import AttentionPool, Block, ConvStemEmbed, LayerScale, PatchEmbed, ShiftedPatchEmbed
from .pos_embed import resample_pos_embed


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) / DeiT (Touvron et al. 2021) with timm's parameter names.

    Built from a ``ViTConfig``, or from its fields as keyword arguments (which also override a given config);
    ``model.config`` is the exact architecture, the one ``save_pretrained`` writes.

    Args:
        config: the architecture; None = ``ViTConfig()`` (ViT-B/16 at 224 px, 1000 classes).
        **fields: ``ViTConfig`` fields (img_size, patch_size, embed_dim, depth, num_heads, ...; see its Args).

    Example:
        >>> model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=2)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
        >>> VisionTransformer(model.config).config == model.config
        True
    """

    def __init__(self, config: ViTConfig | None = None, **fields: Any):
        super().__init__()
        config = (config or ViTConfig()).replace(**fields)
        # timm's rule: average pooling normalises after pooling (fc_norm) instead of before (norm).
        config = self.config = config.replace(fc_norm=config.uses_fc_norm)
        embed_dim, depth = config.embed_dim, config.depth
        self.img_size = config.image_hw
        self.patch_size = config.patch_size
        self.in_chans = config.in_chans
        self.num_classes = config.num_classes
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = config.global_pool
        self.distilled = config.distilled
        self.dynamic_img_size = config.dynamic_img_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.grad_checkpointing = False

        # CLIP: the LayerNorm after the position embedding replaces the patch projection's bias
        if config.embed_layer == "spt":
            self.patch_embed = ShiftedPatchEmbed(config.img_size, config.patch_size, config.in_chans, embed_dim)
        elif config.embed_layer == "conv_stem":
            self.patch_embed = ConvStemEmbed(config.img_size, config.patch_size, config.in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, embed_dim,
                                          bias=not config.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if config.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, embed_dim)) if config.reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if config.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_pos_prefix_tokens + self.patch_embed.num_patches,
                                                  embed_dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        norm_eps, use_fc_norm, num_classes = config.norm_eps, config.fc_norm, config.num_classes
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if config.pre_norm else nn.Identity()
        # linear stochastic-depth rule
        drop_path = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        windows = [0 if i in config.global_attn_indexes else config.window_size for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(config, drop_path[i], windows[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if config.final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPool(config) if config.global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) \
            if config.distilled else None
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """ViT/timm reference: trunc-normal(0.02) for position embeddings and linear weights, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.attn_pool is not None:
            trunc_normal_(self.attn_pool.latent, std=self.embed_dim ** -0.5)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(_init_module)

    # ---- forward ----------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos_embed = resample_pos_embed(pos_embed, grid, self.patch_embed.grid_size,
                                           self.config.num_pos_prefix_tokens)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token, self.dist_token)
                  if t is not None]
        if self.config.no_embed_class:  # DeiT III, DINOv2 + registers: positions for the patches only
            x = x + pos_embed
        if prefix:
            x = torch.cat(prefix + [x], dim=1)  # (B, N, D) -> (B, prefix + N, D)
        if not self.config.no_embed_class:
            x = x + pos_embed
        return self.norm_pre(self.pos_drop(x))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the tokens the first block reads: (B, C, H, W) -> (B, prefix + N, D)."""
        return self._embed_with_grid(x)[0]

    def _embed_with_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``_embed`` and the patch grid (rows, cols) it made, which windowed attention needs."""
        grid = self._check_input(x)
        return self._pos_embed(self.patch_embed(x), grid), grid

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """While training: prefix tokens and a random ``1 - patch_drop_rate`` of each image's patch tokens (at
        least one), in random order (their position embeddings are already added, so order carries nothing)."""
        rate = self.config.patch_drop_rate
        if not (self.training and rate):
            return x
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        keep = max(1, int(patches.shape[1] * (1.0 - rate)))  # timm's PatchDropout count
        order = torch.rand(patches.shape[:2], device=x.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1)

    def _run_block(self, block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, grid, use_reentrant=False)
        return block(x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, C, H, W) -> (B, prefix + N, D); while training with
        ``patch_drop_rate``, N is the patches kept."""
        x, grid = self._embed_with_grid(x)
        x = self._drop_patches(x)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False):
        """Patch tokens after chosen blocks, for dense tasks (timm's contract).

        ``indices``: the last N blocks (int), these block indices (negative count from the end), or all (None).
        ``norm`` applies the final norm to each; ``output_fmt`` ``"NCHW"`` gives (B, D, H/p, W/p) maps, ``"NLC"``
        (B, N, D) tokens; prefix tokens (class, registers) are dropped, or paired with each output when
        ``return_prefix_tokens``. Returns ``(final tokens after the norm, intermediates)``, or only the list.

        Example:
            >>> m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, reg_tokens=2)
            >>> final, maps = m.forward_intermediates(torch.zeros(1, 3, 32, 32), indices=2)
            >>> final.shape, [tuple(t.shape) for t in maps]
            (torch.Size([1, 19, 32]), [(1, 32, 4, 4), (1, 32, 4, 4)])
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        take = (list(range(depth - indices, depth)) if isinstance(indices, int)
                else list(range(depth)) if indices is None else [i % depth for i in indices])
        if any(not 0 <= i < depth for i in take) or (isinstance(indices, int) and not 0 < indices <= depth):
            raise ValueError(f"indices: expected block indices of a {depth}-block model, got {indices!r}")
        batch, _, height, width = x.shape
        x, grid = self._embed_with_grid(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x, grid)
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in outputs]
        outputs = [y[:, self.num_prefix_tokens:] for y in outputs]
        if output_fmt == "NCHW":
            rows, cols = height // self.patch_size, width // self.patch_size
            outputs = [y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for y in outputs]
        if return_prefix_tokens:
            outputs = list(zip(outputs, prefix))
        return outputs if intermediates_only else (self.norm(x), outputs)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the class token, the mean of the patch tokens, attention pooling over the
        patch tokens (``map``), or every token unchanged (``""``). Register tokens never enter a pool."""
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == "":
            return x
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from ``forward_features`` -> logits (or the pooled features when ``pre_logits``)."""
        features = self.head_drop(self.fc_norm(self.pool(x)))
        if self.head_dist is not None:
            # DeiT distilled (timm's contract): features and logits are the means over the class and
            # distillation tokens.
            dist_features = self.head_drop(self.fc_norm(x[:, 1]))
            if pre_logits:
                return (features + dist_features) / 2
            return (self.head(features) + self.head_dist(dist_features)) / 2
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, each (B, heads, N, N); computed on request, not in ``forward``."""
        x, grid = self._embed_with_grid(x)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_map(block.norm1(x), grid))
            x = block(x, grid)
        return maps

    # ---- timm-style utilities ---------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (and the distillation head) with a fresh one for ``num_classes`` (0 = none)."""
        global_pool = self.global_pool if global_pool is None else global_pool
        if (global_pool == "map") != (self.attn_pool is not None):
            raise ValueError(f"global_pool: cannot switch between 'map' and {global_pool or self.global_pool!r} "
                             f"on a built model (the attention pool's weights exist only with 'map'); build a "
                             f"new model from model.config.replace(global_pool=...)")
        self.config = self.config.replace(num_classes=num_classes, global_pool=global_pool)
        self.global_pool, self.num_classes = global_pool, num_classes
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
        names = {"pos_embed", "cls_token", "reg_token", "dist_token", "attn_pool.latent"}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, (nn.LayerNorm, LayerScale)):
                names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
            elif getattr(module, "bias", None) is not None:
                names.add(prefix + "bias")
            if isinstance(getattr(module, "scale", None), nn.Parameter):  # LSA's learned temperature
                names.add(prefix + "scale")
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

