"""Patch Detailer Heads (paper §3.4, Table 2).

Every head maps, for each of the M = B*N patches in parallel, the noisy pixel patch
(M, C, P, P) and its trunk token (M, D) to a refined prediction for that patch (M, C, P, P).
The DiP model does the patchify/fold around them, once, for all head types.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dip_scale.models.blocks import Block, FinalLayer, rope_2d


def _conv3x3(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU())


class ConvUNetHead(nn.Module):
    """The paper's head: a shallow U-Net per patch. Down: conv3x3+SiLU then 2x max-pool per level;
    bottleneck: concat(pooled features, token) -> 1x1 conv + SiLU; up: 2x upsample, concat the
    skip, conv3x3+SiLU; out: 1x1 conv. Channels 64,128,256,512 give the released layout
    (Appendix Table 4); the token enters only at the bottleneck (P/2^levels wide)."""

    def __init__(self, token_dim: int, patch_size: int, channels: list[int], upsample: str, in_ch: int = 3):
        super().__init__()
        chans = list(channels)
        self.down = nn.ModuleList(_conv3x3(a, b) for a, b in zip([in_ch] + chans[:-1], chans))
        self.bottleneck = nn.Sequential(nn.Conv2d(chans[-1] + token_dim, chans[-1], 1), nn.SiLU())
        outs = chans[-2::-1] + [chans[0]]  # 256, 128, 64, 64
        ins = [chans[-1]] + outs[:-1]  # 512, 256, 128, 64
        skips = chans[::-1]  # 512, 256, 128, 64
        if upsample == "transposed":
            self.up = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, stride=2) for c in ins)
        else:
            self.up = nn.ModuleList(nn.Upsample(scale_factor=2, mode="nearest") for _ in ins)
        self.fuse = nn.ModuleList(_conv3x3(a + s, o) for a, s, o in zip(ins, skips, outs))
        self.out = nn.Conv2d(chans[0], in_ch, 1)

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x, skips = patches, []
        for conv in self.down:
            x = conv(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        side = x.shape[-1]
        x = self.bottleneck(torch.cat([x, tokens[:, :, None, None].expand(-1, -1, side, side)], dim=1))
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class MLPHead(nn.Module):
    """Standard MLP over concat(token, flattened patch): no spatial inductive bias (the paper's
    weakest head)."""

    def __init__(self, token_dim: int, patch_size: int, width: int | None, depth: int | None, in_ch: int = 3):
        super().__init__()
        n = in_ch * patch_size * patch_size
        dims = [token_dim + n] + [width or token_dim] * ((depth or 3) - 1) + [n]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([tokens, patches.flatten(1)], dim=1)).view_as(patches)


class CoordMLPHead(nn.Module):
    """Coordinate MLP (PixNerd-style neural field): the token generates the weights of a small
    per-pixel MLP whose input is the noisy pixel and Fourier features of its normalised
    coordinates in the patch. Generated weight columns are L2-normalised to keep the field
    well-scaled whatever the token's magnitude."""

    num_freqs = 8

    def __init__(self, token_dim: int, patch_size: int, width: int | None, depth: int | None, in_ch: int = 3):
        super().__init__()
        self.patch_size = patch_size
        width = width or 64
        in_dim = in_ch + 4 * self.num_freqs
        self.shapes = [(in_dim, width)] + [(width, width)] * ((depth or 2) - 1)
        self.hyper = nn.Linear(token_dim, sum(a * b for a, b in self.shapes))
        self.out = nn.Linear(width, in_ch)

    def _coord_features(self, device, dtype) -> torch.Tensor:
        p = self.patch_size
        pos = (torch.arange(p, device=device, dtype=torch.float32) + 0.5) / p * 2 - 1
        ys, xs = torch.meshgrid(pos, pos, indexing="ij")
        freqs = math.pi * 2.0 ** torch.arange(self.num_freqs, device=device, dtype=torch.float32)
        ang = torch.cat([xs.reshape(-1, 1) * freqs, ys.reshape(-1, 1) * freqs], dim=-1)
        return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)  # (P*P, 4F)

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        m, c, p, _ = patches.shape
        h = patches.flatten(2).transpose(1, 2)  # (M, P*P, C)
        h = torch.cat([h, self._coord_features(h.device, h.dtype).expand(m, -1, -1)], dim=-1)
        weights = self.hyper(tokens).split([a * b for a, b in self.shapes], dim=-1)
        for w, (a, b) in zip(weights, self.shapes):
            h = F.silu(torch.bmm(h, F.normalize(w.view(m, a, b), dim=1)))
        return self.out(h).transpose(1, 2).reshape(m, c, p, p)


class PatchAttentionHead(nn.Module):
    """Intra-patch attention: a small transformer over the P*P pixels of each patch (2D RoPE over
    the pixel grid), every block adaLN-conditioned on the patch's token."""

    def __init__(self, token_dim: int, patch_size: int, width: int | None, depth: int | None, in_ch: int = 3):
        super().__init__()
        self.patch_size = patch_size
        width = width or 64
        self.num_heads = max(1, width // 16)
        self.embed = nn.Linear(in_ch, width)
        self.blocks = nn.ModuleList(Block(width, self.num_heads, cond_dim=token_dim) for _ in range(depth or 2))
        self.final = FinalLayer(width, in_ch, cond_dim=token_dim)

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        m, c, p, _ = patches.shape
        x = self.embed(patches.flatten(2).transpose(1, 2))
        rope = rope_2d(x.shape[-1] // self.num_heads, p, p, x.device)
        for block in self.blocks:
            x = block(x, tokens, rope)
        return self.final(x, tokens).transpose(1, 2).reshape(m, c, p, p)


def build_head(head_cfg, token_dim: int, patch_size: int) -> nn.Module:
    """The detailer head named by `head_cfg.type` (a dip_scale.models.spec.HeadConfig)."""
    if head_cfg.type == "conv_unet":
        return ConvUNetHead(token_dim, patch_size, head_cfg.channels, head_cfg.upsample)
    heads = {"mlp": MLPHead, "coord_mlp": CoordMLPHead, "patch_attention": PatchAttentionHead}
    if head_cfg.type not in heads:
        raise ValueError(f"model.head.type: {head_cfg.type!r} has no detailer head; valid: conv_unet, {', '.join(heads)}")
    return heads[head_cfg.type](token_dim, patch_size, head_cfg.width, head_cfg.depth)
