"""REPA (representation alignment): a trainable projector maps the trunk's hidden state after
block k onto the patch features of a frozen vision encoder of the clean image; the loss is
mean(1 - cos). The encoder is DINOv2 (ViT-B/14 in the paper) built here from the official
checkpoint's own layout and read from a local file: nothing is fetched at run time.

`FeatureEncoder` is the small interface the objective needs, so tests can plug any encoder.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureEncoder(Protocol):
    """Frozen encoder: images in [-1, 1] (B,3,H,W) -> patch features (B, T, embed_dim) on a
    square grid of T tokens."""

    embed_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------
# DINOv2 ViT with the official parameter names (blocks.i.attn.qkv, ls1.gamma, ...) so the
# released checkpoints load with strict=True.
# ------------------------------------------------------------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp_hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT (MLP FFN variants: ViT-S/B/L /14, with or without register tokens)."""

    def __init__(self, dim: int, depth: int, num_heads: int, patch: int, pos_grid: int, mlp_hidden: int, num_registers: int = 0):
        super().__init__()
        self.embed_dim = dim
        self.patch = patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; kept for strict loading
        self.blocks = nn.ModuleList(_ViTBlock(dim, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "DINOv2":
        """Infer the architecture from an official checkpoint's shapes (head dim is 64 in all
        DINOv2 ViTs) and load it strictly."""
        if any(k.startswith("blocks.0.mlp.w12") for k in sd):
            raise ValueError("SwiGLU DINOv2 (ViT-g) checkpoints are not supported; use ViT-S/B/L /14")
        dim = sd["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        model = cls(
            dim=dim,
            depth=depth,
            num_heads=dim // 64,
            patch=sd["patch_embed.proj.weight"].shape[-1],
            pos_grid=math.isqrt(sd["pos_embed"].shape[1] - 1),
            mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
            num_registers=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        )
        model.load_state_dict(sd, strict=True)
        return model

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embed.float()
        n = math.isqrt(pos.shape[1] - 1)
        if gh == n and gw == n:
            return pos
        patch_pos = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        # the official +0.1 offset on the target grid before bicubic resampling
        patch_pos = F.interpolate(patch_pos, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic")
        return torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> final-normed patch tokens (`x_norm_patchtokens`)."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h // self.patch, w // self.patch).to(tokens.dtype)
        n_reg = 0
        if hasattr(self, "register_tokens"):
            n_reg = self.register_tokens.shape[1]
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1 + n_reg :]


class DINOv2Encoder(nn.Module):
    """FeatureEncoder around a frozen DINOv2: [-1,1] images -> [0,1] -> bicubic resize to
    `resolution` -> ImageNet normalisation -> patch tokens."""

    def __init__(self, vit: DINOv2, resolution: int = 224):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.embed_dim = vit.embed_dim
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_checkpoint(cls, path: str, resolution: int = 224) -> "DINOv2Encoder":
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"objective.repa.weights: DINOv2 checkpoint not found: {path}") from None
        except Exception as e:  # torch.load raises UnpicklingError / RuntimeError / EOFError by format
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"objective.repa.weights: {path} is not a checkpoint of tensors "
                             f"(e.g. dinov2_vitb14_pretrain.pth): {first}") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        return cls(DINOv2.from_state_dict(sd), resolution)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return self.vit(x.to(self.vit.pos_embed.dtype))


class RepaAligner(nn.Module):
    """Projector (D -> W -> W -> encoder dim, SiLU) and the alignment loss. The encoder is held
    outside the module tree on purpose: frozen, never sharded by ZeRO, never checkpointed."""

    def __init__(self, encoder: FeatureEncoder, hidden_size: int, align_block: int, weight: float, projector_width: int | None = None):
        super().__init__()
        self.__dict__["encoder"] = encoder  # not a submodule (see class docstring)
        self.align_block = align_block
        self.weight = weight
        w = projector_width or hidden_size
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, encoder.embed_dim)
        )

    def forward(self, hidden: torch.Tensor, clean_images: torch.Tensor) -> torch.Tensor:
        target = self.encoder(clean_images).float()
        n, t = hidden.shape[1], target.shape[1]
        if n != t:  # different token grids: area-resample the encoder features to the trunk's grid
            g, gt = math.isqrt(n), math.isqrt(t)
            grid = target.transpose(1, 2).reshape(target.shape[0], -1, gt, gt)
            target = F.interpolate(grid, size=(g, g), mode="area").flatten(2).transpose(1, 2)
        z = self.projector(hidden).float()
        return (1 - F.cosine_similarity(z, target, dim=-1)).mean()


def build_repa(repa_cfg, hidden_size: int) -> RepaAligner:
    """REPA from the config: the DINOv2 checkpoint at `repa_cfg.weights` plus a fresh projector."""
    encoder = DINOv2Encoder.from_checkpoint(repa_cfg.weights)
    return RepaAligner(encoder, hidden_size, repa_cfg.align_block, repa_cfg.weight, repa_cfg.projector_width)
