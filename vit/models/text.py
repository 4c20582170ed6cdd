"""The text tower of CLIP / SigLIP, built from the image model's own ``Block``.

token ids (B, L) -> token embedding + learned positions -> Block x depth (causal for CLIP, bidirectional for
SigLIP) -> final LayerNorm -> one token per text (CLIP: the end-of-text token; SigLIP: the last) ->
``text_projection`` into the space the image tower projects to.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ACT_LAYERS, ViTConfig
from .layers import Block

# argmax: the position of the highest id (OpenAI CLIP: the end-of-text token has the highest id);
# eos: the first position of eos_token_id (HF CLIP configs after transformers #24773); last / first: a fixed position
TEXT_POOLS = ("argmax", "eos", "last", "first")


@dataclass(frozen=True)
class TextConfig:
    """Architecture of a CLIP / SigLIP text tower; invalid values fail at construction.

    Args:
        context_length: tokens per text (CLIP 77, SigLIP 64); the learned position table has this many rows.
        vocab_size: rows of the token embedding.
        embed_dim: token width.
        depth: number of encoder blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: bias on the query/key/value projection.
        act_layer: MLP activation (``"quick_gelu"`` for OpenAI CLIP, ``"gelu"``, ``"gelu_tanh"`` for SigLIP).
        norm_eps: LayerNorm epsilon.
        causal: each token attends only to itself and earlier tokens (CLIP); False = bidirectional (SigLIP).
        pool: which token stands for the text: ``"argmax"`` (the highest id, CLIP's end token), ``"eos"`` (the
            first ``eos_token_id``), ``"last"`` (SigLIP) or ``"first"``.
        eos_token_id: the end token for ``pool="eos"``.
        proj_dim: width of the joint image-text space (``text_projection``'s outputs); 0 = no projection.
        proj_bias: ``text_projection`` has a bias (SigLIP's text head).
        init_values: LayerScale start value (None = no LayerScale).

    Example:
        >>> TextConfig(embed_dim=64, num_heads=2, depth=1, proj_dim=32).block_config().embed_dim
        64
        >>> TextConfig(pool="mean")
        Traceback (most recent call last):
        ...
        ValueError: invalid TextTransformer configuration:
          pool: expected one of argmax, eos, last, first, got 'mean'
    """

    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act_layer: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: str = "argmax"
    eos_token_id: int | None = None
    proj_dim: int = 512
    proj_bias: bool = False
    init_values: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for key in ("context_length", "vocab_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{key}: expected a positive integer, got {value!r}")
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim < 0:
            problems.append(f"proj_dim: expected an integer >= 0 (0 = no projection), got {self.proj_dim!r}")
        if not problems and self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.act_layer not in ACT_LAYERS:
            problems.append(f"act_layer: expected one of {', '.join(ACT_LAYERS)}, got {self.act_layer!r}")
        if self.pool not in TEXT_POOLS:
            problems.append(f"pool: expected one of {', '.join(TEXT_POOLS)}, got {self.pool!r}")
        if self.pool == "eos" and self.eos_token_id is None:
            problems.append("pool='eos' needs eos_token_id")
        if not self.mlp_ratio > 0 or not self.norm_eps > 0:
            problems.append(f"mlp_ratio and norm_eps: expected > 0, got {self.mlp_ratio} and {self.norm_eps}")
        if problems:
            raise ValueError("invalid TextTransformer configuration:\n  " + "\n  ".join(problems))

    def block_config(self) -> ViTConfig:
        """The settings the shared ``Block`` reads (the image model's config type, image fields at defaults)."""
        return ViTConfig(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                         mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, act_layer=self.act_layer,
                         norm_eps=self.norm_eps, init_values=self.init_values, num_classes=0)

    def replace(self, **changes: Any) -> "TextConfig":
        """A copy with ``changes`` applied (and checked); unknown names raise ``TypeError`` naming them."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise TypeError(f"unknown TextConfig field(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TextConfig":
        return cls().replace(**dict(values))


class TextTransformer(nn.Module):
    """CLIP / SigLIP text encoder: (B, L) token ids -> (B, proj_dim) text features.

    Keys: ``token_embedding.weight``, ``pos_embed`` (1, L, D), ``blocks.N.*`` (the image model's names),
    ``norm``, ``text_projection`` (a linear layer; ``.bias`` only with ``proj_bias``).

    Example:
        >>> text = TextTransformer(context_length=8, vocab_size=100, embed_dim=32, depth=1, num_heads=2, proj_dim=16)
        >>> text(torch.tensor([[1, 5, 99, 0, 0, 0, 0, 0]])).shape
        torch.Size([1, 16])
    """

    def __init__(self, config: TextConfig | None = None, **fields: Any):
        super().__init__()
        config = self.config = (config or TextConfig()).replace(**fields)
        self.context_length, self.vocab_size = config.context_length, config.vocab_size
        self.embed_dim = config.embed_dim
        self.output_dim = config.proj_dim or config.embed_dim
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.context_length, config.embed_dim))
        block = config.block_config()
        self.blocks = nn.Sequential(*[Block(block) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.text_projection = (nn.Linear(config.embed_dim, config.proj_dim, bias=config.proj_bias)
                                if config.proj_dim else nn.Identity())
        causal = torch.ones(config.context_length, config.context_length, dtype=torch.bool).tril()
        self.register_buffer("attn_mask", causal if config.causal else None, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's starting values for the embeddings; trunc-normal(0.02) linear weights, zero biases."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_input(self, token_ids: torch.Tensor) -> None:
        if token_ids.ndim != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TextTransformer expects integer token ids of shape (B, L), got "
                             f"{tuple(token_ids.shape)} {token_ids.dtype}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise ValueError(f"TextTransformer: token ids must lie in [0, {self.vocab_size}), got "
                             f"{int(token_ids.min())}..{int(token_ids.max())}: a tokenizer of another vocabulary?")
        if token_ids.shape[1] > self.context_length:
            raise ValueError(f"TextTransformer: {token_ids.shape[1]} tokens per text, but the context holds "
                             f"{self.context_length}; tokenize with context_length={self.context_length}")

    def forward_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm: (B, L) -> (B, L, D)."""
        self._check_input(token_ids)
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.pos_embed[:, :length]
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
        return self.norm(x)

    def pool(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the token ``config.pool`` names."""
        pool = self.config.pool
        if pool == "last":
            return x[:, -1]
        if pool == "first":
            return x[:, 0]
        # argmax picks the first of equal maxima: the end token, not padding that repeats it
        where = token_ids.argmax(dim=-1) if pool == "argmax" else \
            (token_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), where]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, output_dim) text features (not normalised)."""
        return self.text_projection(self.pool(self.forward_features(token_ids), token_ids))

    def no_weight_decay(self) -> set[str]:
        """Embeddings, norms and biases take no weight decay."""
        return {n for n, p in self.named_parameters()
                if n in ("pos_embed", "token_embedding.weight") or n.endswith(".bias") or p.ndim < 2}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
