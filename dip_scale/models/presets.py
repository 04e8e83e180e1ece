"""Trunk presets as small factory functions (pure Python: the config validates against them
without importing torch). Name = size/patch; XL follows the paper (Table 4: 26 blocks, 1152
wide, 16 heads), the others follow DiT's S/B/L widths; `tiny` is the CPU preset."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional


@dataclass(frozen=True)
class TrunkSpec:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 * mlp_ratio * hidden_size)


def tiny(patch_size: int) -> TrunkSpec:
    return TrunkSpec(depth=4, hidden_size=128, num_heads=4, patch_size=patch_size)


def small(patch_size: int) -> TrunkSpec:
    return TrunkSpec(depth=12, hidden_size=384, num_heads=6, patch_size=patch_size)


def base(patch_size: int) -> TrunkSpec:
    return TrunkSpec(depth=12, hidden_size=768, num_heads=12, patch_size=patch_size)


def large(patch_size: int) -> TrunkSpec:
    return TrunkSpec(depth=24, hidden_size=1024, num_heads=16, patch_size=patch_size)


def xlarge(patch_size: int) -> TrunkSpec:
    return TrunkSpec(depth=26, hidden_size=1152, num_heads=16, patch_size=patch_size)


_SIZES: dict[str, Callable[[int], TrunkSpec]] = {"tiny": tiny, "S": small, "B": base, "L": large, "XL": xlarge}
PRESETS: dict[str, TrunkSpec] = {f"{n}/{p}": f(p) for n, f in _SIZES.items() for p in (8, 16, 32)}


def resolve_trunk(
    preset: str,
    depth: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_heads: Optional[int] = None,
) -> TrunkSpec:
    """The preset's trunk with any explicit overrides applied."""
    spec = PRESETS[preset]
    changes = {k: v for k, v in (("depth", depth), ("hidden_size", hidden_size), ("num_heads", num_heads)) if v is not None}
    return replace(spec, **changes)
