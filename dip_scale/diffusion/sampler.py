"""Euler / Heun ODE samplers from t = 1 (noise) to t = 0 (data) with classifier-free guidance
restricted to a t-interval (Kynkäänniemi et al. 2024). Each image's starting noise comes from
its own seed, so a sample does not depend on batch size, batch composition or device count."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm


EDGE_TOL = 1e-6  # a grid time within this of an interval end is on that end (float32 grids)


def cfg_scale_at(t: float, scale: float, interval: Sequence[float], method: str = "euler") -> float:
    """Guidance scale of the step starting at time t: `scale` inside the interval, 1 (no guidance)
    outside. The ends follow the released sampler, which tests its own time r = 1 - t with
    r_min < r < r_max (Euler) and r_min < r <= r_max (Heun): here Euler guides on the open
    interval (low, high) and Heun on [low, high). With 100 steps and the paper's [0.03, 0.89]
    both ends lie on the grid, so this decides whether steps t = 0.89 and t = 0.03 are guided."""
    low, high = interval
    above_low = t >= low - EDGE_TOL if method == "heun" else t > low + EDGE_TOL
    return scale if above_low and t < high - EDGE_TOL else 1.0


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, image i drawn from a CPU generator seeded seeds[i]."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def guided_velocity(model, x, t: float, y, null_class: int, w: float):
    """v(x, t | y) guided with scale w by batch doubling; w = 1 skips the unconditional pass."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if w == 1.0:
        return model(x, tt, y)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)])).chunk(2)
    return v_uncond + w * (v_cond - v_uncond)


@torch.no_grad()
def sample(
    model,
    labels: torch.Tensor,
    seeds: Sequence[int],
    *,
    image_size: int,
    null_class: int,
    steps: int = 100,
    method: str = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    channels: int = 3,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to t=0 on a uniform grid of `steps` steps; returns images in
    [-1, 1] (clamped). Heun adds the trapezoidal corrector on every step but the last (t=0), and
    like the released sampler guides its corrector evaluation with the scale of the step's start."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler method must be 'euler' or 'heun', got {method!r}")
    if len(seeds) != len(labels):
        raise ValueError(f"one seed per label is needed: {len(seeds)} seeds for {len(labels)} labels")
    device = labels.device
    x = initial_noise(seeds, (channels, image_size, image_size)).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not progress, leave=False):
        w = cfg_scale_at(t, cfg_scale, cfg_interval, method)
        dt = t_next - t
        v_t = guided_velocity(model, x, t, labels, null_class, w).float()
        x_next = x + dt * v_t
        if method == "heun" and t_next > 0:
            x_next = x + dt * 0.5 * (v_t + guided_velocity(model, x_next, t_next, labels, null_class, w).float())
        x = x_next
    return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B,C,H,W) -> uint8 (B,H,W,C), the rounding FID evaluation expects."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
