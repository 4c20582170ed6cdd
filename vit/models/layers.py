"""Building blocks of the Vision Transformer: plain ``nn.Module``s with timm's parameter names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple
from torch import nn

from .config import ViTConfig, mlp_hidden

# Longest sequence that attention() computes explicitly when training in bf16 on a CPU: the (N, N) weights of a
# batch are then materialised, which beyond this costs more memory than the fused kernel's speed is worth losing.
EXPLICIT_ATTENTION_MAX_TOKENS = 2048


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (default scale; boolean ``attn_mask``, True = may attend), except when
    training in bf16 on a CPU: there PyTorch's fused CPU kernel picks flash attention, whose backward pass is 1.4-6x
    slower than the plain softmax(q k^T) v at ViT lengths (65-1025 tokens: ``benchmarks/attention.py``), so the
    plain form runs instead. The same function either way; fp32 and inference keep the fused kernel (faster
    there).

    Example:
        >>> q = k = v = torch.randn(2, 4, 17, 8, dtype=torch.bfloat16, requires_grad=True)
        >>> torch.allclose(attention(q, k, v).float(), F.scaled_dot_product_attention(q, k, v).float(), atol=2e-2)
        True
    """
    if not use_explicit_attention(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return explicit_attention(q, k, v, attn_mask, dropout_p)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, formed step by step (what ``attention`` runs when training in bf16 on a CPU)."""
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask, float("-inf"))
    weights = weights.softmax(dim=-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


def use_explicit_attention(q: torch.Tensor) -> bool:
    """Whether ``attention`` computes softmax(q k^T) v explicitly for these queries: bf16 on a CPU, with gradients
    to compute, at most ``EXPLICIT_ATTENTION_MAX_TOKENS`` queries (self-attention: as many keys)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and q.requires_grad
            and q.shape[-2] <= EXPLICIT_ATTENTION_MAX_TOKENS)


class PatchGrid(nn.Module):
    """The sizes every patch embedding tells the model: ``img_size`` and ``patch_size`` (pairs), the patch grid
    (rows, cols) and its token count."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int | tuple[int, int]):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]


class PatchEmbed(PatchGrid):
    """Cut an image into non-overlapping patches and project each to ``embed_dim``.

    Example:
        >>> PatchEmbed(img_size=32, patch_size=4, embed_dim=64)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True):
        super().__init__(img_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # -> (B, N, D)


class ShiftedPatchEmbed(PatchGrid):
    """Shifted Patch Tokenization (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"): the image and
    four copies shifted diagonally by half a patch are cut into patches together, so each token also sees its
    neighbours' pixels; then LayerNorm and a linear projection. (B, C, H, W) -> (B, N, D).

    Example:
        >>> ShiftedPatchEmbed(img_size=32, patch_size=4, embed_dim=64)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__(img_size, patch_size)
        patch_dim = 5 * in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dy, dx = self.patch_size[0] // 2, self.patch_size[1] // 2
        # zero-padded shifts towards the four corners: (left, right, top, bottom) padding, then crop back
        shifted = [F.pad(x, pad)[..., top:top + x.shape[-2], left:left + x.shape[-1]]
                   for pad, top, left in (((dx, 0, dy, 0), 0, 0), ((0, dx, dy, 0), 0, dx),
                                          ((dx, 0, 0, dy), dy, 0), ((0, dx, 0, dy), dy, dx))]
        x = torch.cat([x, *shifted], dim=1)  # (B, C, H, W) -> (B, 5C, H, W)
        patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # -> (B, 5C*p*p, N)
        return self.proj(self.norm(patches.transpose(1, 2)))  # -> (B, N, D)


class ConvStemEmbed(PatchGrid):
    """A convolutional stem instead of the patchify projection (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): for patch size p = 2^k, k blocks of 3x3 convolution with stride 2, BatchNorm and
    ReLU (widths doubling up to ``embed_dim``), then a 1x1 convolution to ``embed_dim``. Each token still covers
    one p x p patch of the grid, but sees its neighbours' pixels and is built by local filters, which a ViT
    trained from scratch on little data otherwise has to learn. (B, C, H, W) -> (B, N, D).

    Example:
        >>> ConvStemEmbed(img_size=32, patch_size=4, embed_dim=64)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 64, 64])
        >>> [tuple(block.conv.weight.shape) for block in ConvStemEmbed(32, 4, 3, 64).stem]
        [(32, 3, 3, 3), (64, 32, 3, 3)]
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__(img_size, patch_size)
        stages = conv_stem_stages(self.patch_size[0])
        widths = [embed_dim >> (stages - 1 - i) for i in range(stages)]
        self.stem = nn.Sequential(*[ConvBNReLU(c_in, c_out) for c_in, c_out in zip([in_chans, *widths], widths)])
        self.proj = nn.Conv2d(widths[-1], embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class ConvBNReLU(nn.Module):
    """3x3 convolution with stride 2 (no bias: BatchNorm follows), BatchNorm, ReLU: one stage of ``ConvStemEmbed``."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # He init, as for ResNets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def conv_stem_stages(patch_size: int) -> int:
    """Stride-2 stages of a convolutional stem for ``patch_size`` (a power of 2, at least 2): log2 of it."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a convolutional stem needs a patch size that is a power of 2 (2, 4, 8, 16), "
                         f"got {patch_size}")
    return patch_size.bit_length() - 1


class Attention(nn.Module):
    """Multi-head self-attention through ``attention`` (``scaled_dot_product_attention``, or its plain form
    when training in bf16 on a CPU).

    ``locality=True`` is Locality Self-Attention (Lee et al. 2021): a learned temperature instead of the fixed
    1/sqrt(head_dim), and no token attends to itself, which sharpens attention on small datasets.

    ``window_size > 0`` is ViTDet's windowed attention (Li et al. 2022): see ``window_attention``; ``forward``
    then needs the patch grid."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality: bool = False, window_size: int = 0, num_prefix_tokens: int = 0):
        super().__init__()
        self.num_heads = num_heads
        # ViTDet windowed attention (0 = global); the prefix tokens' count tells the patch grid's first token
        self.window_size = window_size
        self.num_prefix_tokens = num_prefix_tokens
        self.head_dim = dim // num_heads
        self.locality = locality
        # LSA: the scale is learned (starting at the usual value); a Parameter, so checkpoints keep it
        self.scale = nn.Parameter(torch.tensor(self.head_dim ** -0.5)) if locality else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _locality(self, q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LSA: q rescaled so that SDPA's fixed scale becomes the learned one; a mask without the diagonal."""
        if not self.locality:
            return q, None
        mask = ~torch.eye(n, dtype=torch.bool, device=q.device)  # True = may attend
        return q * (self.scale * self.head_dim ** 0.5), mask

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``grid``: the patch grid (windowed attention needs it); ``attn_mask``: (N, N) booleans, True = may
        attend (the text tower's causal mask)."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        dropout = self.attn_drop if self.training else 0.0
        if self.window_size:
            if attn_mask is not None:
                raise ValueError("windowed attention takes no attn_mask (it builds its own windows)")
            x = window_attention(q, k, v, _grid(grid, N - self.num_prefix_tokens), self.window_size,
                                 self.num_prefix_tokens, dropout)
        else:
            q, mask = self._locality(q, N)
            if attn_mask is not None:
                mask = attn_mask if mask is None else mask & attn_mask
            x = attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, C/heads) -> (B, N, C)
        return self.proj_drop(self.proj(x))

    def attention_map(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Softmax attention weights (B, heads, N, N), computed explicitly (the fused path never forms them);
        a windowed block's weights are zero outside each token's window."""
        q, k, _ = self._qkv(x)
        q, mask = self._locality(q, x.shape[1])
        if self.window_size:
            grid = _grid(grid, x.shape[1] - self.num_prefix_tokens)
            mask = window_mask(grid, self.window_size, self.num_prefix_tokens, device=x.device)
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window_size: int,
                     num_prefix_tokens: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """ViTDet's windowed attention on (B, heads, prefix + H*W, C/heads) queries, keys and values.

    The patch grid (H, W) is padded at the bottom/right to multiples of ``window_size`` and cut into
    non-overlapping windows; each patch token attends to the tokens of its window (never to the padding, which is
    masked out, unlike detectron2's zero padding, so a token's output does not depend on where the grid ends)
    and to the prefix tokens. The prefix tokens (class, registers) attend to every token, as in a global block.
    Why: detectron2's ViTDet drops the class token, but our backbones may carry one into a checkpoint; letting
    the few prefix tokens join every window costs P extra keys per window and P global queries (cheap), adds no
    parameter, and makes a window that covers the whole grid exactly global attention.

    Example:
        >>> q = k = v = torch.randn(1, 2, 1 + 5 * 7, 8)
        >>> window_attention(q, k, v, grid=(5, 7), window_size=4, num_prefix_tokens=1).shape
        torch.Size([1, 2, 36, 8])
    """
    B, heads, _, dim = q.shape
    P, (H, W), ws = num_prefix_tokens, grid, window_size
    rows, cols = -(-H // ws), -(-W // ws)  # windows per column and per row

    def windows(t: torch.Tensor) -> torch.Tensor:
        # (B, heads, H*W, d) -> (B, heads, H', W', d) padded -> (B * windows, heads, ws*ws, d)
        t = F.pad(t[:, :, P:].reshape(B, heads, H, W, dim), (0, 0, 0, cols * ws - W, 0, rows * ws - H))
        t = t.reshape(B, heads, rows, ws, cols, ws, dim).permute(0, 2, 4, 1, 3, 5, 6)
        return t.reshape(B * rows * cols, heads, ws * ws, dim)

    q_win, k_win, v_win = windows(q), windows(k), windows(v)
    if P:  # every window also sees the prefix tokens (batch-major, like the windows)
        k_win = torch.cat([k[:, :, :P].repeat_interleave(rows * cols, dim=0), k_win], dim=2)
        v_win = torch.cat([v[:, :, :P].repeat_interleave(rows * cols, dim=0), v_win], dim=2)
    mask = None
    if rows * ws != H or cols * ws != W:
        real = torch.zeros(rows * ws, cols * ws, dtype=torch.bool, device=q.device)
        real[:H, :W] = True
        real = real.reshape(rows, ws, cols, ws).transpose(1, 2).reshape(rows * cols, ws * ws)
        real = torch.cat([real.new_ones(rows * cols, P), real], dim=1)
        mask = real.repeat(B, 1)[:, None, None, :]  # (B * windows, 1, 1, P + ws*ws): True = may attend
    out = attention(q_win, k_win, v_win, attn_mask=mask, dropout_p=dropout_p)
    # (B * windows, heads, ws*ws, d) -> (B, heads, H'*W', d), padding dropped -> (B, heads, H*W, d)
    out = out.reshape(B, rows, cols, heads, ws, ws, dim).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(B, heads, rows * ws, cols * ws, dim)[:, :, :H, :W].reshape(B, heads, H * W, dim)
    if P:
        prefix = attention(q[:, :, :P], k, v, dropout_p=dropout_p)
        out = torch.cat([prefix, out], dim=2)
    return out


def window_mask(grid: tuple[int, int], window_size: int, num_prefix_tokens: int = 0,
                device: torch.device | None = None) -> torch.Tensor:
    """The (prefix + H*W, prefix + H*W) boolean mask (True = may attend) that turns global attention into
    ``window_attention``: what the windowed path computes without forming it.

    Example:
        >>> window_mask((2, 2), 1, num_prefix_tokens=1).int().tolist()
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]]
    """
    H, W = grid
    window = ((torch.arange(H, device=device) // window_size)[:, None] * W
              + torch.arange(W, device=device) // window_size).flatten()  # window index of each patch
    mask = torch.ones(num_prefix_tokens + H * W, num_prefix_tokens + H * W, dtype=torch.bool, device=device)
    mask[num_prefix_tokens:, num_prefix_tokens:] = window[:, None] == window[None, :]
    return mask


def _grid(grid: tuple[int, int] | None, num_patches: int) -> tuple[int, int]:
    if grid is None or grid[0] * grid[1] != num_patches:
        raise ValueError(f"windowed attention needs the patch grid (rows, cols) of the {num_patches} patch tokens, "
                         f"got {grid!r}")
    return grid


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (features differ measurably from exact GELU's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The MLP activation ``ViTConfig.act_layer`` names."""
    return {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
            "quick_gelu": QuickGELU, "silu": lambda: nn.SiLU()}[name]()


class Mlp(nn.Module):
    """Two linear layers with an activation between them."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """Packed SwiGLU (timm's ``SwiGLUPacked``, DINOv2 giant): ``fc1`` makes both halves, act(first) * second."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "silu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # (B, N, hidden) -> 2 x (B, N, hidden / 2)
        return self.drop2(self.fc2(self.drop1(self.act(gate) * value)))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT / DeiT III / DINOv2), starting at ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x)); each branch optionally LayerScaled.
    ``window_size > 0``: windowed attention over the patch grid that ``forward`` is given."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0, window_size: int = 0):
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.num_heads, qkv_bias=config.qkv_bias, attn_drop=config.attn_drop_rate,
                              proj_drop=config.drop_rate, locality=config.attn_layer == "lsa",
                              window_size=window_size, num_prefix_tokens=config.num_prefix_tokens)
        self.ls1 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        mlp = SwiGLU if config.mlp_layer == "swiglu" else Mlp
        self.mlp = mlp(dim, mlp_hidden(config), act_layer=config.act_layer, drop=config.drop_rate)
        self.ls2 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPool(nn.Module):
    """Multi-head attention pooling with a learned query (SigLIP's MAP head; timm's ``attn_pool`` keys):
    the latent attends to every token, then a residual MLP. (B, N, D) -> (B, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = dim // config.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, mlp_hidden(config), act_layer=config.act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        # (B, N, 2C) -> (2, B, heads, N, C/heads)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v).transpose(1, 2).reshape(B, 1, C)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
