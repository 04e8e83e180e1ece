"""Training callbacks: a plain-file metrics log, a non-finite-loss guard, and periodic EMA
sample grids. Throughput and MFU come from Composer's SpeedMonitor (training/loggers.py)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from dip_scale import naming

log = logging.getLogger(__name__)


class MetricsJSONL(Callback):
    """Appends one JSON object per logged step to <run_dir>/metrics.jsonl (rank 0): `step` is the
    number of completed batches, the losses are Composer's all-rank means, plus the learning
    rate, epoch, samples seen and wall-clock time; with `sample_ids`, the sorted ids of the global
    batch's samples too (a data-order audit: a gather over the ranks per logged step). On
    resume, lines written after the checkpoint the run restarts from are dropped, so the file
    reads like one uninterrupted run."""

    def __init__(self, path: str, interval: str, sample_ids: bool = False):
        self.path = path
        self.sample_ids = sample_ids
        self.should_log = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self._last: Optional[tuple[float, int]] = None  # (time, samples) at the previous line

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if not os.path.exists(self.path):
            return
        resumed_at = state.timestamp.batch.value
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_at]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.should_log(state, Event.BATCH_END):
            return
        ids = None
        if self.sample_ids:  # every rank takes part
            ids = sorted(i for part in dist.all_gather_object(state.batch[2].tolist()) for i in part)
        if dist.get_global_rank() != 0:
            return
        row = {"step": state.timestamp.batch.value, "epoch": state.timestamp.epoch.value, "sample": state.timestamp.sample.value}
        if ids is not None:
            row["sample_ids"] = ids
        for key, value in (state.total_loss_dict or {}).items():
            name = key.split("/")[-1]
            row["loss" if name == "total" else f"loss_{name}"] = value
        row["lr"] = state.optimizers[0].param_groups[0]["lr"]
        now, samples = time.time(), state.timestamp.sample.value
        if self._last is not None and now > self._last[0]:
            row["images_per_sec"] = round((samples - self._last[1]) / (now - self._last[0]), 2)
        self._last = (now, samples)
        row["time"] = round(now, 3)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        # what this line adds to what Composer logs itself (losses, time/*, SpeedMonitor's throughput)
        logger.log_metrics({"lr": row["lr"], **({"throughput/images_per_sec": row["images_per_sec"]} if "images_per_sec" in row else {})})


class RunConfig(Callback):
    """Keeps the resolved config with every checkpoint (in Composer's state) and hands it to the
    loggers once, at fit start, flattened to dotted names."""

    def __init__(self, config: dict):
        self.config = config

    def fit_start(self, state: State, logger: Logger) -> None:
        from dip_scale.training.loggers import flatten

        logger.log_hyperparameters(flatten(self.config))  # dotted names: model.head.type, ...

    def state_dict(self) -> dict:
        return {"config": self.config}

    def load_state_dict(self, state: dict) -> None:
        previous = state.get("config")
        if previous is not None and previous != self.config:
            log.warning("resuming with a config that differs from the checkpoint's; the new one is used")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; nothing from that batch on was checkpointed."""


class NonFiniteGuard(Callback):
    """Stops training on the first non-finite loss, at BATCH_END: before that batch's checkpoint
    event, so the latest checkpoint stays the last good one. The loss checked is Composer's
    all-rank mean, so every rank stops on the same batch without an extra collective."""

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = state.total_loss_dict or {}
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if not bad:
            return
        last = None
        for cb in state.callbacks:
            saved = getattr(cb, "saved_checkpoints", None)
            if saved:
                last = saved[-1]
        where = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"training stopped: non-finite loss at batch {state.timestamp.batch.value} "
            f"({', '.join(f'{k}={v}' for k, v in bad.items())}); nothing from this batch on was saved and "
            f"{where}. Lower optimizer.lr, add deepspeed.gradient_clipping, or check the data."
        )


class SampleGrid(Callback):
    """Every `interval`, samples fixed classes with fixed seeds from the EMA weights and writes
    <run_dir>/samples/ba<step>.png (rank 0), also handed to Composer's loggers."""

    def __init__(self, ema, sampler_cfg, interval: str, classes: Sequence[int], seed: int, run_dir: str, class_names: Optional[Sequence[str]] = None):
        self.ema = ema
        self.sampler_cfg = sampler_cfg
        self.should_sample = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self.classes = list(classes)
        self.seed = seed
        self.run_dir = run_dir
        self.class_names = class_names
        self.written: list[str] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.should_sample(state, Event.BATCH_END):
            self.write(state, logger)

    def write(self, state: State, logger: Logger) -> Optional[str]:
        from dip_scale.diffusion.sampler import sample
        from dip_scale.visual import image_grid, save_png

        model = self.ema.full_model()  # collective: every rank takes part, rank 0 gets the model
        if model is None:
            return None
        device = next(iter(state.model.parameters())).device
        model = model.to(device)
        s = self.sampler_cfg
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = sample(
                model, torch.tensor(self.classes, device=device), [self.seed + i for i in range(len(self.classes))],
                image_size=model.image_size, null_class=model.num_classes, steps=s.steps, method=s.method,
                cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval,
            )
        titles = [self.class_names[c] if self.class_names else str(c) for c in self.classes]
        grid = image_grid(images.cpu(), titles=titles)
        path = save_png(grid, os.path.join(self.run_dir, naming.grid(state.timestamp.batch.value)))
        logger.log_images(np.asarray(grid), name="samples/ema", channels_last=True, use_table=False)
        self.written.append(path)
        log.info("EMA sample grid: %s", path)
        return path
