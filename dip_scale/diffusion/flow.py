"""Flow matching in the paper's convention (Appendix A): x_t = (1 - t) x0 + t eps with t in [0, 1]
(t = 1 is pure noise); the network regresses the velocity v = dx_t/dt = eps - x0 with an MSE.
Times are logit-normal (sigmoid of N(mean, std)); labels are dropped to the null class with
probability `label_dropout` so one network serves both terms of classifier-free guidance."""
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


def sample_time(n: int, kind: str, mean: float, std: float, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    return torch.rand(n, device=device, generator=generator)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


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

    def forward(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        t = sample_time(x0.shape[0], self.time_sampling, self.mean, self.std, x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = interpolate(x0, noise, t)
        y = drop_labels(y, self.label_dropout, self.null_class, generator) if self.training else y
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
