"""The DiP model family. `build_model(model_config)` is the public entry point; torch is only
imported when a model is built, so config validation stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from dip_scale.models.spec import ModelConfig
    from dip_scale.models.dip import DiP


def build_model(model_config: "ModelConfig") -> "DiP":
    from dip_scale.models.dip import DiP

    return DiP.from_config(model_config)


__all__ = ["build_model"]
