"""Transformer building blocks (DDT-style, as released with DiP).

One `Block` serves both the trunk and the intra-patch attention head: pre-norm RMSNorm,
attention with qk RMSNorm and 2D RoPE through `scaled_dot_product_attention`, a SwiGLU MLP, and
adaLN shift/scale/gate modulation from a condition vector.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, p, p), patches in row-major order."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c, p, p)


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, N, C, p, p) -> (B, C, H, W); the inverse of `patchify`."""
    b, _, c, p, _ = patches.shape
    return patches.view(b, grid_h, grid_w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid_h * p, grid_w * p)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 statistics are too coarse), returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


ROPE_SPAN = 16.0  # released DiP: grid positions run over [0, 16] along each axis, whatever the grid


def rope_positions(n: int, device=None) -> torch.Tensor:
    """Positions of n tokens along one axis: linspace(0, ROPE_SPAN, n), as in the released DiP
    (steps of 16/15 on a 16-token side at 256 px, 16/31 on a 32-token side at 512 px)."""
    return torch.linspace(0.0, ROPE_SPAN, n, dtype=torch.float32, device=device)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, device, theta: float = 10000.0):
    """cos/sin tables (N, head_dim/2) of 2D rotary embeddings for a row-major grid. Rotated pair
    2j follows the column position and pair 2j+1 the row position, both at frequency
    theta^(-4j/head_dim): the released DiP's interleaved x/y layout, so its q/k weights load
    without any channel permutation."""
    n_freq = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, 4 * n_freq, 4, dtype=torch.float32, device=device) / head_dim)
    ys, xs = torch.meshgrid(rope_positions(grid_h, device), rope_positions(grid_w, device), indexing="ij")
    angles = torch.stack([xs.reshape(-1, 1) * freqs, ys.reshape(-1, 1) * freqs], dim=-1).flatten(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x (..., N, head_dim) by the angles of each token."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block modulated (adaLN) by a per-sequence condition c: (B, cond_dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN = nn.Linear(cond_dim or dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """DiT output layer: non-affine LayerNorm, adaLN shift/scale from c, Linear to out_dim."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Linear(cond_dim or dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] through a 2-layer MLP. The max period is 10 (as in the
    released code): DiT's 10000 assumes integer steps up to 1000 and would waste most features."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, device=None) -> torch.Tensor:
        """(freq_dim/2,) float32 frequencies; the features of t are [cos(t f), sin(t f)]."""
        half = self.freq_dim // 2
        return torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.frequencies(t.device)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, index `num_classes`, for the null label of CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)
