"""The ComposerModel Composer and DeepSpeed train: DiP plus the flow-matching objective (and the
REPA projector when enabled). The frozen REPA encoder is not part of this module tree, so it is
neither trained, nor partitioned by ZeRO, nor written into checkpoints.

Batches are (uint8 images, int64 labels, int64 sample ids) from the streaming loader; the
[-1, 1] float pixels and the flow times are made here, inside forward, so Composer's DeepSpeed
batch cast (which turns float32 batch tensors into bf16) never touches them. The sample ids and
the step (set by the `TrainingStep` callback) key each sample's noise (diffusion/flow.py).
"""
from __future__ import annotations

from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import ComposerModel

from dip_scale.data.imagenet import to_model_range
from dip_scale.diffusion.flow import FlowMatchingObjective, sample_keys
from dip_scale.models.dip import DiP


class DiPComposerModel(ComposerModel):
    def __init__(self, model: DiP, objective: FlowMatchingObjective, macs_per_image: float, seed: int = 0):
        super().__init__()
        self.model = model
        self.objective = objective
        self.macs_per_image = macs_per_image
        self.seed = seed
        self.step = 0  # the batch being trained, set by TrainingStep

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        keys = sample_keys(self.seed, self.step, batch[2].tolist()) if len(batch) > 2 else None
        return self.objective(self.model, to_model_range(images), labels, keys=keys)

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        return outputs  # {"total", "fm"[, "repa"]}: Composer backpropagates "total" and logs each

    def flops_per_batch(self, batch: Any) -> float:
        """Training FLOPs of one batch: forward MACs x 2 FLOPs x 3 (forward + backward), the
        SpeedMonitor's numerator for MFU (the REPA encoder's forward is not counted)."""
        return 6.0 * self.macs_per_image * batch[0].shape[0]

    def get_metrics(self, is_train: bool = False) -> dict:
        return {}  # evaluation runs as separate jobs, never inside the training loop

    def eval_forward(self, batch: Any, outputs: Any = None) -> Any:
        return outputs if outputs is not None else self.forward(batch)


class TrainingStep(Callback):
    """Tells the model which batch it trains (the step in each sample's noise key)."""

    def __init__(self, model: DiPComposerModel):
        self.model = model

    def batch_start(self, state: State, logger: Logger) -> None:
        self.model.step = int(state.timestamp.batch)
