"""Start a fresh run from a model file (`trainer.init_from`): an EMA export of another run, or a
released DiP imported with dip-import-released.

The weights are loaded into the module before DeepSpeed wraps it, so every rank starts from
them and ZeRO partitions them as usual; the REPA projector comes from the file's
`aux.repa_projector.*` when it has one. Under DeepSpeed bf16 the fp32 master weights would be
copies of the bf16-rounded parameters: `ExactMasters` writes the file's fp32 values into them
at fit start, before the EMA takes its starting copy, so EMA and optimizer start from the file
exactly. A run that resumes from its own checkpoint never calls any of this.
"""
from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from dip_scale.schema import ConfigError
from dip_scale.training.ema import owned_fragments

log = logging.getLogger(__name__)
PROJECTOR = "repa_projector."


def load_init_weights(path: str, composer_model, model_cfg) -> dict[str, torch.Tensor]:
    """Load the model file into `composer_model` (DiP + REPA projector); -> its fp32 tensors by
    the ComposerModel's parameter names, for `ExactMasters`."""
    from dip_scale.models.export import load_model_file
    from dip_scale.models.spec import architecture_differences

    try:
        weights, aux, stored, _ = load_model_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"trainer.init_from: {e}") from None
    diff = architecture_differences(stored, model_cfg)
    if diff:
        raise ConfigError(f"trainer.init_from: {path} holds another architecture than model: ({'; '.join(diff)}; file != config)")
    composer_model.model.load_state_dict(weights, strict=True)
    full = {f"model.{k}": v.float() for k, v in weights.items()}
    repa = composer_model.objective.repa
    projector = {k[len(PROJECTOR):]: v for k, v in aux.items() if k.startswith(PROJECTOR)}
    if repa is not None and projector:
        try:
            repa.projector.load_state_dict(projector, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"trainer.init_from: the REPA projector in {path} does not fit objective.repa "
                              f"({str(e).splitlines()[-1].strip()})") from None
        full.update({f"objective.repa.projector.{k}": v.float() for k, v in projector.items()})
    log.info("starting from %s (%d tensors%s)", path, len(weights),
             ", REPA projector" if repa is not None and projector else
             ", fresh REPA projector" if repa is not None else "")
    return full


class ExactMasters(Callback):
    """At fit start, DeepSpeed's fp32 master weights := the model file's fp32 values (see module
    docstring). Must run before the EMA callback."""

    def __init__(self, full: dict[str, torch.Tensor]):
        self.full = full

    def fit_start(self, state: State, logger: Logger) -> None:
        frags, _ = owned_fragments(state, prefix="")
        with torch.no_grad():
            for name, (view, start, numel) in frags.items():
                if name in self.full:
                    view.copy_(self.full[name].reshape(-1).narrow(0, start, numel).to(view.device, view.dtype))
        self.full = {}
