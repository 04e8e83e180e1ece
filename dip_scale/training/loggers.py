"""Composer's own loggers and callbacks from the `loggers:` / `callbacks:` sections
(docs/operations.md). The sections carry Composer's argument names (config.py); this module turns
them into Composer objects, on every rank (some loggers broadcast their run ids at INIT, a
collective), with three small subclasses where Composer 0.27's class would lose what a dip_scale
run logs:

* TensorBoard: Composer writes hyper-parameters only at an evaluator's end (training runs none):
  the resolved config is written once as TensorBoard hparams (HParams tab), after FIT_START.
  Non-zero ranks open no event file when `rank_zero_only`.
* W&B: a step must never go back, so FID-suite results (logged at their checkpoint's step when
  they arrive, possibly many steps later) get their own x-axis `eval/step` (wandb.define_metric)
  and are written into the current step instead of being dropped.
* MLflow: a parameter may never change its value in a run; a resumed run (`resume: true`) whose
  config differs in a value keeps the first value and says so, instead of failing training.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
from typing import Any, Optional

from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

# section name -> (Composer class, the package it needs, that package's pin as Composer 0.27's extras have it)
LOGGERS = {
    "tensorboard": ("TensorboardLogger", "tensorboard", "tensorboard>=2.9.1,<3"),
    "mlflow": ("MLFlowLogger", "mlflow", "mlflow-skinny>=2.14.1,<3"),
    "wandb": ("WandBLogger", "wandb", "wandb>=0.13.2,<0.19"),
    "file": ("FileLogger", None, None),
    "console": ("ConsoleLogger", None, None),
    "remote_uploader": ("RemoteUploaderDownloader", None, None),
}
CALLBACKS = {
    "lr_monitor": "LRMonitor",
    "speed_monitor": "SpeedMonitor",
    "runtime_estimator": "RuntimeEstimator",
    "memory_monitor": "MemoryMonitor",
    "system_metrics_monitor": "SystemMetricsMonitor",
    "memory_snapshot": "MemorySnapshot",
    "oom_observer": "OOMObserver",
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the config as hyper-parameters (MLflow params, TensorBoard
    hparams and W&B config all take flat names)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _kwargs(section) -> dict[str, Any]:
    return dataclasses.asdict(section)


def build_loggers(cfg: ExperimentConfig, run_dir: str) -> list:
    """The LoggerDestinations the `loggers:` section selects (all ranks)."""
    out = []
    for name, (cls_name, package, pin) in LOGGERS.items():
        section = getattr(cfg.loggers, name)
        if section is None:
            continue
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"loggers.{name}: the {package} package is not installed here "
                              f"(pip install '{pin}', or dip_scale's `loggers` extra)")
        kw = _kwargs(section)
        if name == "tensorboard":
            kw["log_dir"] = kw["log_dir"] or os.path.join(run_dir, "tensorboard")
            out.append(TensorboardLogger(**kw))
        elif name == "mlflow":
            out.append(MLFlowLogger(**kw))
        elif name == "wandb":
            init = dict(kw.pop("init_kwargs") or {})
            mode, wandb_dir = kw.pop("mode"), kw.pop("dir")
            if mode is not None:
                init["mode"] = mode
            init.setdefault("dir", wandb_dir or run_dir)
            os.makedirs(init["dir"], exist_ok=True)
            out.append(WandBLogger(**kw, init_kwargs=init))
        elif name == "file":
            kw["filename"] = kw["filename"] or os.path.join(run_dir, "logs-rank{rank}.txt")
            kw["remote_file_name"] = kw["remote_file_name"] or "{run_name}/logs-rank{rank}.txt"  # (Composer: the local path)
            out.append(composer_loggers.FileLogger(**kw))
        elif name == "console":
            kw["stream"] = sys.stdout if kw["stream"] == "stdout" else sys.stderr
            out.append(composer_loggers.ConsoleLogger(**kw))
        else:
            out.append(getattr(composer_loggers, cls_name)(**kw))
    return out


def build_callbacks(cfg: ExperimentConfig) -> list:
    """The Composer callbacks the `callbacks:` section selects; SpeedMonitor is always there
    (throughput, MFU with logging.peak_flops)."""
    out = []
    for name, cls_name in CALLBACKS.items():
        section = getattr(cfg.callbacks, name)
        if section is None and name != "speed_monitor":
            continue
        cls = getattr(composer_callbacks, cls_name)
        if name == "speed_monitor":
            kw = _kwargs(section) if section is not None else {}
            if kw.get("gpu_flops_available") is None:
                kw["gpu_flops_available"] = cfg.logging.peak_flops
            kw.setdefault("window_size", 50)
            out.append(cls(**kw))
        else:
            out.append(cls(**_kwargs(section)))
    return out


# --------------------------------------------------------------------------------------------
class TensorboardLogger(composer_loggers.TensorboardLogger):
    """Composer's, plus the hyper-parameters as TensorBoard hparams (see the module docstring)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._hparams_written = False

    def _mine(self) -> bool:
        return not self.rank_zero_only or dist.get_global_rank() == 0

    def init(self, state: State, logger: Logger) -> None:
        self.run_name = state.run_name
        if self._mine():
            super().init(state, logger)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]):
        if self._mine():
            self.hyperparameters.update(hyperparameters)  # raw values; formatted when written

    def log_images(self, images, name: str = "Images", channels_last: bool = False, step: Optional[int] = None, masks=None,
                   mask_class_labels=None, use_table: bool = False):
        if self._mine() and self.writer is not None:
            super().log_images(images, name, channels_last, step, masks, mask_class_labels, use_table)

    def _write_hparams(self) -> None:
        if self._hparams_written or not self._mine() or self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hyperparameters.items()}
        writer = self.writer._get_file_writer()
        for summary in hparams(values, {}):
            writer.add_summary(summary)
        self._hparams_written = True

    def batch_end(self, state: State, logger: Logger) -> None:
        self._write_hparams()  # FIT_START has passed: every callback has handed over its hyper-parameters
        super().batch_end(state, logger)

    def eval_end(self, state: State, logger: Logger) -> None:
        self._flush(logger)  # (Composer's writes hparams here; training runs no evaluator)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._write_hparams()
        super().fit_end(state, logger)


class WandBLogger(composer_loggers.WandBLogger):
    """Composer's, with FID-suite results on their own x-axis (see the module docstring)."""

    EVAL_PREFIX = "eval/"
    EVAL_STEP = "eval/step"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._step = 0

    def init(self, state: State, logger: Logger) -> None:
        super().init(state, logger)
        if self._enabled:
            import wandb

            wandb.define_metric(self.EVAL_STEP)
            wandb.define_metric(self.EVAL_PREFIX + "*", step_metric=self.EVAL_STEP)

    def _at(self, step: Optional[int]) -> Optional[int]:
        if step is None:
            return None
        self._step = max(self._step, step)
        return self._step

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if step is not None and any(k.startswith(self.EVAL_PREFIX) for k in metrics):
            metrics = {**metrics, self.EVAL_STEP: step}
        super().log_metrics(metrics, self._at(step))

    def log_images(self, images, name: str = "Images", channels_last: bool = False, step: Optional[int] = None, masks=None,
                   mask_class_labels=None, use_table: bool = False):
        super().log_images(images, name, channels_last, self._at(step), masks, mask_class_labels, use_table)


class MLFlowLogger(composer_loggers.MLFlowLogger):
    """Composer's; a parameter whose value changed across a resume keeps its first value (MLflow
    refuses to change one) with a warning, instead of failing training."""

    MAX_VALUE = 6000  # MLflow's limit on a parameter's value

    def __init__(self, **kw):
        super().__init__(**kw)
        self._params: Optional[dict[str, str]] = None

    def log_hyperparameters(self, hyperparameters: dict[str, Any]):
        if not self._enabled:
            return
        if self._params is None:
            self._params = dict(self._mlflow_client.get_run(self._run_id).data.params) if self._run_id else {}
        new = {}
        for key, value in hyperparameters.items():
            text = str(value)[: self.MAX_VALUE]
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                log.warning("mlflow: parameter %s stays %r in the resumed MLflow run (now %r): MLflow never changes a parameter",
                            key, old[:200], text[:200])
        if new:
            self._params.update(new)
            super().log_hyperparameters(new)
