"""Flow matching in the paper's convention (Appendix A): x_t = (1 - t) x0 + t eps with t in [0, 1]
(t = 1 is pure noise); the network regresses the velocity v = dx_t/dt = eps - x0 with an MSE.
Times are logit-normal (sigmoid of N(mean, std)); labels are dropped to the null class with
probability `label_dropout` so one network serves both terms of classifier-free guidance.

In training every sample's time, label drop and noise come from a generator of its own, seeded
by a key of (run seed, step, sample id) (`sample_keys`): the draws do not depend on which rank
holds the sample, its batch-mates or the world size, so a run resumed on another number of GPUs
sees the same noise as the uninterrupted one (docs/architecture.md, "Elastic resume")."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def _time(kind: str, mean: float, std: float, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(mean + std * normal) if kind == "logit_normal" else uniform


def sample_time(n: int, kind: str, mean: float, std: float, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    normal = torch.randn(n, device=device, generator=generator) if kind == "logit_normal" else None
    uniform = torch.rand(n, device=device, generator=generator) if kind != "logit_normal" else None
    return _time(kind, mean, std, normal, uniform)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: Optional[torch.Generator] = None, uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    if uniform is None:
        uniform = torch.rand(y.shape, device=y.device, generator=generator)
    return torch.where(uniform < p, torch.full_like(y, null_class), y)


KEY_MASK = (1 << 63) - 1


def sample_keys(seed: int, step: int, sample_ids) -> list[int]:
    """One generator seed per sample, unique per (run seed, step, sample id)."""
    base = ((int(seed) * 0x9E3779B1 + int(step)) << 32) & KEY_MASK
    return [(base ^ int(i)) & KEY_MASK for i in sample_ids]


def keyed_draws(keys, shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normal (B,), uniform (B,), uniform (B,), noise (B, *shape)): sample i's from a generator
    seeded keys[i], always in that order."""
    normal, uni_t, uni_y, noise = [], [], [], []
    for key in keys:
        g = torch.Generator(device=device).manual_seed(int(key))
        normal.append(torch.randn(1, device=device, generator=g))
        uni_t.append(torch.rand(1, device=device, generator=g))
        uni_y.append(torch.rand(1, device=device, generator=g))
        noise.append(torch.randn(tuple(shape), device=device, dtype=dtype, generator=g))
    return torch.cat(normal), torch.cat(uni_t), torch.cat(uni_y), torch.stack(noise)


class FlowMatchingObjective(nn.Module):
    """total = MSE(model(x_t, t, y'), eps - x0) [+ repa.weight * REPA alignment], returned with
    its parts {"total", "fm"[, "repa"]} (Composer backpropagates "total"). Holds only the
    trainable REPA projector (if any); the frozen encoder lives outside the module tree."""

    def __init__(self, cfg, num_classes: int, repa: Optional[nn.Module] = None):
        super().__init__()
        self.time_sampling = cfg.time_sampling
        self.mean, self.std = cfg.logit_normal_mean, cfg.logit_normal_std
        self.label_dropout = cfg.label_dropout
        self.null_class = num_classes
        self.repa = repa

    def forward(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
                keys: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
        """`keys`: one generator seed per sample (sample_keys); else draws come from `generator`
        (or the global RNG) for the whole batch."""
        if keys is not None:
            normal, uni_t, uni_y, noise = keyed_draws(keys, x0.shape[1:], x0.device, x0.dtype)
            t = _time(self.time_sampling, self.mean, self.std, normal, uni_t)
        else:
            uni_y = None
            t = sample_time(x0.shape[0], self.time_sampling, self.mean, self.std, x0.device, generator)
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = interpolate(x0, noise, t)
        y = drop_labels(y, self.label_dropout, self.null_class, generator, uniform=uni_y) if self.training else y
        if self.repa is None:
            pred = model(x_t, t, y)
        else:
            pred, hidden = model(x_t, t, y, capture=self.repa.align_block)
        fm = F.mse_loss(pred.float(), velocity_target(x0, noise).float())
        out = {"total": fm, "fm": fm}
        if self.repa is not None:
            align = self.repa(hidden, x0)
            out["repa"] = align
            out["total"] = fm + self.repa.weight * align
        return out
