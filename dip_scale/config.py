"""Typed experiment configuration: one YAML per run, dotlist overrides, strict validation.

Every key of the experiment YAML is a field of a dataclass below. `load_config` rejects unknown
keys (with a did-you-mean), values outside an enum (listing the valid choices) and wrong types,
and checks cross-field constraints, all before torch or any other heavy module is imported:
a bad config fails in well under a second with one readable message per problem.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_origin, get_type_hints

import yaml

from dip_scale.models.presets import PRESETS
from dip_scale.models.spec import HeadConfig, ModelConfig, model_problems
from dip_scale.schema import FRONT_DOOR, ConfigError, apply_override, build, build_section, read_yaml, time_string_problem

__all__ = ["ConfigError", "ExperimentConfig", "HeadConfig", "ModelConfig", "build_section", "load_config", "to_dict", "to_yaml"]

ShuffleAlgo = Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"]

INCEPTION_FILENAME = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------
@dataclass
class RepaConfig:
    enabled: bool = False
    encoder: Literal["dinov2"] = "dinov2"
    # local path of the official DINOv2 checkpoint (e.g. dinov2_vitb14_pretrain.pth); never downloaded
    weights: Optional[str] = None
    align_block: int = 8  # trunk hidden state after this many blocks is aligned
    weight: float = 0.5
    projector_width: Optional[int] = None  # None: the trunk's hidden size


@dataclass
class ObjectiveConfig:
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    label_dropout: float = 0.1
    repa: RepaConfig = field(default_factory=RepaConfig)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: str = "0ba"  # linear warm-up, then constant (Composer time string)


@dataclass
class EMAConfig:
    decay: float = 0.9999


@dataclass
class DataConfig:
    remote: str = "data/imagenet-mds"  # local folder or s3://bucket/prefix written by convert_imagenet_mds.py
    local: Optional[str] = None  # local shard cache (None: a folder under run_dir)
    split: str = "train"
    batch_size: int = 256  # global batch, split evenly across ranks
    num_workers: int = 8
    shuffle: bool = True
    shuffle_algo: ShuffleAlgo = "py1e"
    num_canonical_nodes: Optional[int] = None
    predownload: Optional[int] = None
    cache_limit: Optional[str] = None
    hflip: bool = False  # off, as in the released DiP code
    validate_hash: bool = False  # check each shard's xxh64 hash (written by the converter) as it enters the cache


@dataclass
class TrainerConfig:
    """Arguments passed to composer.Trainer under Composer's own names."""

    max_duration: str = "600ep"
    save_folder: Optional[str] = None  # local folder or s3://bucket/prefix
    save_interval: str = "10ep"
    save_num_checkpoints_to_keep: int = -1
    autoresume: Optional[bool] = None  # None: on when run_name and save_folder are set
    # delete the checkpoints, EMA exports and eval results of an earlier run in save_folder and
    # start from step 0 (without it, a folder this run cannot resume from is an error)
    start_over: bool = False
    device: Literal["auto", "cpu", "gpu"] = "auto"
    device_train_microbatch_size: Optional[int] = None
    # null: a progress bar when stderr is a terminal, periodic console lines otherwise (k8s logs)
    progress_bar: Optional[bool] = None
    console_log_interval: str = "100ba"
    # a dip_scale model file (an EMA export, or dip-import-released's output) that
    # a fresh run starts from: model weights, EMA, and the REPA projector when the file has one.
    # A run that resumes from its own checkpoints ignores it. Local path or s3://
    init_from: Optional[str] = None


@dataclass
class SamplerConfig:
    method: Literal["euler", "heun"] = "euler"
    steps: int = 100
    cfg_scale: float = 2.9
    # t-interval (t=1 noise, t=0 data) where guidance is applied; its ends as the released
    # sampler: Euler guides on (low, high), Heun on [low, high) (diffusion/sampler.py)
    cfg_interval: list[float] = field(default_factory=lambda: [0.03, 0.89])


@dataclass
class LoggingConfig:
    metrics_interval: str = "10ba"  # one JSON line per interval in <run_dir>/metrics.jsonl
    sample_ids: bool = False  # also record the ids of each logged global batch's samples there (data-order audits)
    sample_interval: str = "10ep"  # EMA sample grid PNG
    sample_classes: Optional[list[int]] = None  # None: spread_classes(model.num_classes)
    sample_seed: int = 0
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU (None: no MFU)
    # where <run_dir>'s artefacts (metrics.jsonl, samples/, fid.jsonl, fid.png, config.yaml) are
    # mirrored as they are written, and restored from on a fresh disk (training/mirror.py). None:
    # <save_folder>/../run (or ../run/<run_name> when that parent is shared) for an s3:// save folder, else no mirror
    run_upload: Optional[str] = None
    run_mirror: bool = True  # false: no mirror, wherever run_upload points
    run_upload_interval: float = 30.0  # seconds between uploads of what changed (every checkpoint waits for one)


@dataclass
class KubernetesConfig:
    """Where and how the `kubernetes` eval backend runs its Jobs (see docker/k8s/)."""

    namespace: Optional[str] = None  # None: the trainer pod's own namespace (else "default")
    image: str = "dip-scale:latest"  # docker/Dockerfile; Inception weights baked in under /opt/dip_scale/weights
    gpus: int = 1
    cpu: str = "8"
    memory: str = "64Gi"
    service_account: Optional[str] = None
    env_secret: Optional[str] = "dip-scale-s3"  # Secret with AWS_* and S3_ENDPOINT_URL, passed as envFrom
    api_server: Optional[str] = None  # None: in-cluster (KUBERNETES_SERVICE_HOST + the pod's service account)
    ttl_seconds_after_finished: int = 86400
    active_deadline_seconds: int = 43200  # a Job running longer is failed by Kubernetes (and retried, eval.max_retries)


@dataclass
class EvalConfig:
    """FID of the EMA weights at every checkpoint, as a job outside the training loop."""

    backend: Literal["none", "local", "kubernetes"] = "none"
    num_samples: int = 50000  # paper: 50k, balanced over classes (50 per class), shuffled
    batch_size: int = 125  # images generated per forward pass in the eval job
    feature_mode: Literal["legacy_tensorflow", "clean"] = "legacy_tensorflow"  # clean-fid mode; legacy_tensorflow = ADM/paper numbers
    # clean-fid's TorchScript Inception (inception-2015-12-05.pt), a local file where the job runs
    inception_weights: Optional[str] = None
    # mean/covariance of the reference set (.npz with mu, sigma: ADM's VIRTUAL_imagenet256_labeled.npz
    # or dip-fid-stats output); local path or s3://
    reference_stats: Optional[str] = None
    # the reference records no (or another) Inception network, e.g. ADM's: compare anyway; the
    # result's protocol says so (without it such a reference is refused)
    foreign_reference: bool = False
    # the paper's Table 1 columns, from one sampling pass (fid always; docs/evaluation.md)
    metrics: list[Literal["fid", "sfid", "is", "precision", "recall"]] = field(
        default_factory=lambda: ["fid", "sfid", "is", "precision", "recall"])
    # guidance scales to evaluate, one result per (checkpoint, scale); None: the sampler's one scale
    cfg_scales: Optional[list[float]] = None
    save_npz: bool = False  # also write each checkpoint's samples as an ADM sample batch (eval/<checkpoint>...samples.npz)
    seed: int = 0  # sample i uses noise seed seed + i
    device: Literal["auto", "cpu", "gpu"] = "auto"  # of the eval job
    processes: int = 0  # sampling processes of the eval job, one per GPU (0: every visible GPU; 1 on CPU)
    max_parallel: int = 1  # local backend: eval processes at a time (the rest queue)
    max_retries: int = 2  # an eval that fails is dispatched again (a new Job / process) up to this many times
    wait_at_end: bool = False  # local backend: training waits for queued evals before exiting
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)


# --------------------------------------------------------------------------------------------
# loggers: / callbacks: Composer's own classes under their own argument names (docs/operations.md).
# Each present section switches one on ({} = its defaults); absent or null = off. Defaults are
# Composer's except where a comment says otherwise (tests/test_loggers.py checks the names and
# defaults against Composer 0.27's signatures).
# --------------------------------------------------------------------------------------------
TimeUnitName = Literal["seconds", "minutes", "hours", "days"]


@dataclass
class TensorboardSection:
    """composer.loggers.TensorboardLogger: event files in <log_dir>/<run_name>/."""

    log_dir: Optional[str] = None  # None: <run_dir>/tensorboard (Composer: ./tensorboard_logs)
    flush_interval: int = 100
    rank_zero_only: bool = True


@dataclass
class MLflowSection:
    """composer.loggers.MLFlowLogger (mlflow-skinny is enough; tracking_uri: file:/path for a local store)."""

    experiment_name: Optional[str] = None
    run_name: Optional[str] = None
    tags: Optional[dict[str, Any]] = None
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else ./mlruns
    rank_zero_only: bool = True
    flush_interval: int = 10
    model_registry_prefix: str = ""
    model_registry_uri: Optional[str] = None
    synchronous: bool = False
    log_system_metrics: bool = True
    rename_metrics: Optional[dict[str, Any]] = None
    ignore_metrics: Optional[list[str]] = None
    ignore_hyperparameters: Optional[list[str]] = None
    run_group: Optional[str] = None
    resume: bool = True  # dip_scale: true (Composer: false), a restarted run continues its MLflow run
    logging_buffer_seconds: Optional[int] = 10
    log_duplicated_metric_every_n_steps: int = 100


@dataclass
class WandBSection:
    """composer.loggers.WandBLogger; `mode` and `dir` are wandb.init arguments, put into init_kwargs."""

    project: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    entity: Optional[str] = None
    tags: Optional[list[str]] = None
    log_artifacts: bool = False
    rank_zero_only: bool = True
    init_kwargs: Optional[dict[str, Any]] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: wandb's own (WANDB_MODE, else online)
    dir: Optional[str] = None  # None: <run_dir> (wandb writes <dir>/wandb/<run>/)


@dataclass
class FileSection:
    """composer.loggers.FileLogger: every logged value as text lines ({run_name}, {rank} are filled in)."""

    filename: Optional[str] = None  # None: <run_dir>/logs-rank{rank}.txt (Composer: {run_name}/logs-rank{rank}.txt)
    remote_file_name: Optional[str] = None  # with loggers.remote_uploader (None: {run_name}/logs-rank{rank}.txt)
    capture_stdout: bool = True
    capture_stderr: bool = True
    buffer_size: int = 1
    log_traces: bool = True
    flush_interval: int = 100
    overwrite: bool = False


@dataclass
class ConsoleSection:
    """composer.loggers.ConsoleLogger; replaces the one trainer.progress_bar / console_log_interval make."""

    log_interval: str = "1ba"
    stream: Literal["stderr", "stdout"] = "stderr"
    log_traces: bool = False


@dataclass
class RemoteUploaderSection:
    """composer.loggers.RemoteUploaderDownloader: the files other loggers hand over (TensorBoard
    events, FileLogger logs, memory traces) uploaded to bucket_uri."""

    bucket_uri: str = ""  # required: s3://bucket (the bucket only; a prefix goes into file_path_format_string)
    backend_kwargs: Optional[dict[str, Any]] = None
    file_path_format_string: str = "{remote_file_name}"  # e.g. runs/{run_name}/logs/{remote_file_name}
    num_concurrent_uploads: int = 1
    upload_staging_folder: Optional[str] = None
    use_procs: bool = True
    num_attempts: int = 3


@dataclass
class LoggersConfig:
    tensorboard: Optional[TensorboardSection] = None
    mlflow: Optional[MLflowSection] = None
    wandb: Optional[WandBSection] = None
    file: Optional[FileSection] = None
    console: Optional[ConsoleSection] = None
    remote_uploader: Optional[RemoteUploaderSection] = None


@dataclass
class LRMonitorSection:
    """composer.callbacks.LRMonitor (no arguments): lr-<optimizer class>/group<i> every batch."""


@dataclass
class SpeedMonitorSection:
    """composer.callbacks.SpeedMonitor, always on; this section changes its arguments."""

    window_size: int = 50  # dip_scale: 50 (Composer: 100)
    gpu_flops_available: Optional[float] = None  # None: logging.peak_flops
    time_unit: TimeUnitName = "hours"


@dataclass
class RuntimeEstimatorSection:
    """composer.callbacks.RuntimeEstimator: time/remaining_estimate."""

    skip_batches: int = 1
    time_unit: TimeUnitName = "hours"


@dataclass
class MemoryMonitorSection:
    """composer.callbacks.MemoryMonitor: CUDA allocator statistics (nothing on a CPU)."""

    memory_keys: Optional[dict[str, Any]] = None
    dist_aggregate_batch_interval: Optional[int] = None


@dataclass
class SystemMetricsMonitorSection:
    """composer.callbacks.SystemMetricsMonitor: CPU/memory/disk/network (psutil), GPU (pynvml) per node."""

    log_all_data: bool = False


@dataclass
class MemorySnapshotSection:
    """composer.callbacks.MemorySnapshot: CUDA memory history pickles (GPU only)."""

    skip_batches: int = 1
    interval: str = "3ba"
    max_entries: int = 100000
    folder: str = "{run_name}/torch_traces"
    filename: str = "rank{rank}.{batch}.memory_snapshot"
    remote_file_name: Optional[str] = "{run_name}/torch_memory_traces"
    overwrite: bool = False


@dataclass
class OOMObserverSection:
    """composer.callbacks.OOMObserver: a CUDA memory snapshot when a CUDA OOM happens (GPU only)."""

    max_entries: int = 100000
    folder: str = "{run_name}/torch_traces"
    filename: str = "rank{rank}_oom"
    remote_file_name: Optional[str] = "{run_name}/oom_traces/rank{rank}_oom"
    overwrite: bool = False


@dataclass
class CallbacksConfig:
    lr_monitor: Optional[LRMonitorSection] = None
    speed_monitor: Optional[SpeedMonitorSection] = None
    runtime_estimator: Optional[RuntimeEstimatorSection] = None
    memory_monitor: Optional[MemoryMonitorSection] = None
    system_metrics_monitor: Optional[SystemMetricsMonitorSection] = None
    memory_snapshot: Optional[MemorySnapshotSection] = None
    oom_observer: Optional[OOMObserverSection] = None


# Composer callbacks that are not selectable, and why (docs/operations.md)
UNSUPPORTED_CALLBACKS = {
    "optimizer_monitor": "Composer 0.27 refuses it under DeepSpeed (the Trainer raises): DeepSpeed clears the gradients in "
                         "the last backward, before the callback reads param.grad (DeepSpeed issue #2329)",
    "nan_monitor": "dip_scale's non-finite-loss guard is always on (it stops every rank with exit 3 before the step is saved)",
    "checkpoint_saver": "dip_scale owns checkpointing (trainer.save_folder, trainer.save_interval)",
    "ema": "Composer's EMA keeps a bf16 copy under DeepSpeed bf16 and nothing under ZeRO-3; dip_scale's fp32 EMA is always on (ema.decay)",
    "early_stopper": "it watches evaluator metrics, and training runs no evaluator (evaluation is a separate job)",
    "threshold_stopper": "it watches evaluator metrics, and training runs no evaluator (evaluation is a separate job)",
    "export_for_inference": "Composer's export does not handle a DeepSpeed engine; every checkpoint's EMA is exported as safetensors",
    "image_visualizer": "it logs raw input batches; the EMA sample grids are logged every logging.sample_interval",
}


@dataclass
class ExperimentConfig:
    run_name: str = "dip"
    run_dir: Optional[str] = None  # None: runs/<run_name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # DeepSpeed's own config schema (ZeRO stage, offload, bf16, clipping, ...), checked by
    # dip_scale.training.deepspeed before the Trainer is built
    deepspeed: dict[str, Any] = field(
        default_factory=lambda: {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    )
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir if self.run_dir is not None else os.path.join("runs", self.run_name)


def spread_classes(num_classes: int, n: int = 8) -> list[int]:
    """n class ids spread evenly over 0..num_classes-1: the default classes of sample grids."""
    return sorted({round(i * (num_classes - 1) / max(n - 1, 1)) for i in range(min(n, num_classes))})


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(path: Optional[str], overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Read `path` (None: all defaults), apply `key.sub=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    if overrides:
        # free-form sections (deepspeed) absent from the YAML start from their defaults, so an
        # override such as deepspeed.zero_optimization.stage=3 edits them instead of replacing them
        for f in dataclasses.fields(ExperimentConfig):
            if get_origin(get_type_hints(ExperimentConfig)[f.name]) is dict and f.name not in raw:
                raw[f.name] = f.default_factory()
    for item in overrides:
        apply_override(raw, item)
    errors: list[str] = _unsupported_callbacks(raw)
    cfg = build(ExperimentConfig, raw, "", errors)
    if not errors:
        errors.extend(_cross_checks(cfg))
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n  " + "\n  ".join(errors))
    return cfg


def _unsupported_callbacks(raw: dict[str, Any]) -> list[str]:
    """Composer callbacks that are known and deliberately not selectable get their reason, not a
    did-you-mean (they are taken out of `raw` here)."""
    section = raw.get("callbacks")
    if not isinstance(section, dict):
        return []
    bad = [k for k in section if k in UNSUPPORTED_CALLBACKS]
    if bad:
        raw["callbacks"] = {k: v for k, v in section.items() if k not in UNSUPPORTED_CALLBACKS}
    return [f"callbacks.{k}: not selectable: {UNSUPPORTED_CALLBACKS[k]}" for k in bad]


def run_upload_location(cfg: ExperimentConfig) -> Optional[str]:
    """Where <run_dir>'s artefacts are mirrored ({run_name} filled in), or None: logging.run_upload,
    else, for an s3:// save folder (a local run_dir needs no mirror), <save_folder>/../run when
    that parent is the run's own (it holds {run_name}: s3://b/runs/{run_name}/checkpoints ->
    s3://b/runs/<name>/run), else <save_folder>/../run/<run_name> (runs sharing a parent)."""
    up = cfg.logging.run_upload
    if not cfg.logging.run_mirror:
        return None
    if up:
        return up.replace("{run_name}", cfg.run_name).rstrip("/")
    raw = (cfg.trainer.save_folder or "").rstrip("/")
    if not raw.startswith("s3://"):
        return None
    head, _, tail = raw[len("s3://"):].rpartition("/")
    parent = f"s3://{head}" if head else f"s3://{tail}"
    mirror = f"{parent}/run" if "{run_name}" in head else f"{parent}/run/{{run_name}}"
    return mirror.replace("{run_name}", cfg.run_name)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def split_argv(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """`CONFIG.yaml key=value ...` -> (config path, overrides); the path is optional."""
    if argv and "=" not in argv[0]:
        return argv[0], list(argv[1:])
    return None, list(argv)


# --------------------------------------------------------------------------------------------
# Cross-field checks
# --------------------------------------------------------------------------------------------
def _cross_checks(cfg: ExperimentConfig) -> list[str]:
    errs = model_problems(cfg.model)
    m = cfg.model
    if m.preset not in PRESETS:
        return errs
    trunk = m.trunk()

    o = cfg.objective
    if not 0.0 <= o.label_dropout < 1.0:
        errs.append(f"objective.label_dropout: must be in [0, 1), got {o.label_dropout}")
    if o.logit_normal_std <= 0:
        errs.append(f"objective.logit_normal_std: must be > 0, got {o.logit_normal_std}")
    r = o.repa
    if r.enabled:
        if not r.weights:
            errs.append("objective.repa.weights: REPA is enabled but no encoder weights file is given (a local path; nothing is downloaded)")
        if not 1 <= r.align_block <= trunk.depth:
            errs.append(f"objective.repa.align_block: must be in 1..{trunk.depth}, got {r.align_block}")
        if r.weight < 0:
            errs.append(f"objective.repa.weight: must be >= 0, got {r.weight}")

    t = cfg.trainer
    if t.autoresume and not t.save_folder:
        errs.append("trainer.autoresume: true needs trainer.save_folder")
    if t.max_duration.endswith("dur"):
        errs.append(f"trainer.max_duration: {t.max_duration!r} is relative to itself; use ep, ba, sp or tok")
    errs.extend(deepspeed_problems(cfg.deepspeed))

    opt = cfg.optimizer
    if opt.lr <= 0:
        errs.append(f"optimizer.lr: must be > 0, got {opt.lr}")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        errs.append(f"optimizer.betas: expected two numbers in [0, 1), got {opt.betas}")
    if opt.weight_decay < 0:
        errs.append(f"optimizer.weight_decay: must be >= 0, got {opt.weight_decay}")
    if not 0.0 < cfg.ema.decay < 1.0:
        errs.append(f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")

    d = cfg.data
    if d.batch_size < 1:
        errs.append(f"data.batch_size: must be >= 1, got {d.batch_size}")
    if d.num_workers < 0:
        errs.append(f"data.num_workers: must be >= 0, got {d.num_workers}")

    s = cfg.sampler
    if s.steps < 1:
        errs.append(f"sampler.steps: must be >= 1, got {s.steps}")
    if s.cfg_scale < 0:
        errs.append(f"sampler.cfg_scale: must be >= 0, got {s.cfg_scale}")
    if len(s.cfg_interval) != 2 or not 0.0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1.0:
        errs.append(f"sampler.cfg_interval: expected [low, high] with 0 <= low <= high <= 1, got {s.cfg_interval}")

    ev = cfg.eval
    for name in ("num_samples", "batch_size", "max_parallel"):
        if getattr(ev, name) < (2 if name == "num_samples" else 1):
            errs.append(f"eval.{name}: must be >= {2 if name == 'num_samples' else 1}, got {getattr(ev, name)}")
    if "fid" not in ev.metrics or len(set(ev.metrics)) != len(ev.metrics):
        errs.append(f"eval.metrics: fid is always computed and each metric named once, got {ev.metrics}")
    if ev.cfg_scales is not None and (not ev.cfg_scales or any(c < 0 for c in ev.cfg_scales) or len(set(ev.cfg_scales)) != len(ev.cfg_scales)):
        errs.append(f"eval.cfg_scales: a non-empty list of distinct scales >= 0 (1.0: no guidance), or null for sampler.cfg_scale; got {ev.cfg_scales}")
    if ev.max_retries < 0 or ev.kubernetes.active_deadline_seconds < 1:
        errs.append(f"eval.max_retries must be >= 0 and eval.kubernetes.active_deadline_seconds >= 1, got {ev.max_retries} and {ev.kubernetes.active_deadline_seconds}")
    if ev.processes < 0:
        errs.append(f"eval.processes: must be >= 0 (0: every visible GPU), got {ev.processes}")
    if ev.kubernetes.gpus < 0:
        errs.append(f"eval.kubernetes.gpus: must be >= 0, got {ev.kubernetes.gpus}")
    if ev.backend == "local" and ev.device != "cpu" and ev.processes == 0:
        errs.append("eval.processes: 0 means one process on every visible GPU, which with eval.backend local are the "
                    "GPUs training runs on; set eval.processes (e.g. 1) or eval.device=cpu")
    if ev.backend != "none":
        if not cfg.trainer.save_folder:
            errs.append(f"eval.backend: {ev.backend!r} evaluates the EMA files exported under trainer.save_folder, which is not set")
        if not ev.inception_weights:
            errs.append("eval.inception_weights: needed by eval.backend != none (clean-fid's inception-2015-12-05.pt; nothing is downloaded)")
        elif os.path.basename(ev.inception_weights) != INCEPTION_FILENAME:
            errs.append(f"eval.inception_weights: clean-fid loads a file named {INCEPTION_FILENAME}, got {ev.inception_weights}")
        if not ev.reference_stats:
            errs.append("eval.reference_stats: needed by eval.backend != none (.npz with mu and sigma; see dip-fid-stats)")

    lg = cfg.logging
    if lg.sample_classes is not None and any(not 0 <= c < m.num_classes for c in lg.sample_classes):
        errs.append(f"logging.sample_classes: class ids must be in 0..{m.num_classes - 1}, got {lg.sample_classes}")
    errs.extend(operations_problems(cfg))

    for key, value in (
        ("optimizer.warmup", opt.warmup),  # the one that may be zero
        ("trainer.max_duration", cfg.trainer.max_duration),
        ("trainer.save_interval", cfg.trainer.save_interval),
        ("trainer.console_log_interval", cfg.trainer.console_log_interval),
        ("logging.metrics_interval", lg.metrics_interval),
        ("logging.sample_interval", lg.sample_interval),
    ):
        problem = time_string_problem(key, value, positive=key != "optimizer.warmup")
        if problem:
            errs.append(problem)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", cfg.run_name):
        errs.append(f"run_name: {cfg.run_name!r} may hold only letters, digits, '.', '_' and '-'")
    return errs


def operations_problems(cfg: ExperimentConfig) -> list[str]:
    """The loggers:, callbacks: sections and the run mirror (docs/operations.md)."""
    errs = []
    lg, L, C = cfg.logging, cfg.loggers, cfg.callbacks
    if lg.run_upload_interval <= 0:
        errs.append(f"logging.run_upload_interval: must be > 0 seconds, got {lg.run_upload_interval}")
    up = run_upload_location(cfg)
    if up and not up.startswith("s3://"):
        run_dir = os.path.abspath(cfg.resolved_run_dir)
        if os.path.commonpath([run_dir, os.path.abspath(up)]) in (run_dir, os.path.abspath(up)):
            errs.append(f"logging.run_upload: {lg.run_upload!r} overlaps run_dir {cfg.resolved_run_dir!r}; the mirror must be another folder")
    if L.remote_uploader is not None:
        uri = L.remote_uploader.bucket_uri
        if not re.match(r"^[a-z0-9]+://[^/]+/?$", uri or ""):
            errs.append(f"loggers.remote_uploader.bucket_uri: expected the bucket only, e.g. s3://my-bucket (a prefix goes into "
                        f"loggers.remote_uploader.file_path_format_string), got {uri!r}")
        if "{remote_file_name}" not in L.remote_uploader.file_path_format_string:
            errs.append("loggers.remote_uploader.file_path_format_string: must contain {remote_file_name}")
    if L.file is not None and L.file.remote_file_name and L.remote_uploader is None:
        errs.append("loggers.file.remote_file_name: set, but there is no loggers.remote_uploader to upload it")
    if L.wandb is not None and L.wandb.init_kwargs:
        for key in ("mode", "dir", "project", "group", "name", "entity", "tags"):
            if key in L.wandb.init_kwargs and getattr(L.wandb, key) is not None:
                errs.append(f"loggers.wandb.init_kwargs.{key}: also set as loggers.wandb.{key}; set it once")
    for key, value in (("loggers.console.log_interval", L.console.log_interval if L.console else None),
                       ("callbacks.memory_snapshot.interval", C.memory_snapshot.interval if C.memory_snapshot else None)):
        problem = value is not None and time_string_problem(key, value)
        if problem:
            errs.append(problem)
    for key, value in (("loggers.tensorboard.flush_interval", L.tensorboard.flush_interval if L.tensorboard else 1),
                       ("loggers.mlflow.flush_interval", L.mlflow.flush_interval if L.mlflow else 1),
                       ("loggers.file.flush_interval", L.file.flush_interval if L.file else 1),
                       ("callbacks.speed_monitor.window_size", C.speed_monitor.window_size if C.speed_monitor else 2)):
        if value < 1 or (key.endswith("window_size") and value < 2):
            errs.append(f"{key}: must be >= {2 if key.endswith('window_size') else 1}, got {value}")
    return errs


def s3_locations(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(config key, s3:// URL) of every object-storage location a training run uses."""
    pairs = [("trainer.save_folder", (cfg.trainer.save_folder or "").replace("{run_name}", cfg.run_name)),
             ("data.remote", cfg.data.remote), ("trainer.init_from", cfg.trainer.init_from or "")]
    if cfg.eval.backend != "none":
        pairs.append(("eval.reference_stats", cfg.eval.reference_stats or ""))
    pairs.append(("logging.run_upload", run_upload_location(cfg) or ""))
    return [(k, v) for k, v in pairs if v.startswith("s3://")]


def deepspeed_problems(ds: dict[str, Any]) -> list[str]:
    """What is wrong with the `deepspeed:` section before DeepSpeed is imported (its own schema
    is checked by training/deepspeed.py on the training machine)."""
    if not ds:
        return ["deepspeed: the section is empty; dip_scale trains with DeepSpeed (e.g. zero_optimization: {stage: 2})"]
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero and zero["stage"] not in (0, 1, 2, 3):
        return [f"deepspeed.zero_optimization.stage: {zero['stage']!r} is not a valid choice; valid choices: 0, 1, 2, 3"]
    return []


def missing_files(cfg: ExperimentConfig) -> list[str]:
    """Local input files a training run on this machine reads, checked before anything heavy
    starts. Separate from load_config: summaries and printing need no weights on disk."""
    errs = []
    r, ev = cfg.objective.repa, cfg.eval
    if r.enabled and r.weights and not os.path.isfile(r.weights):
        errs.append(f"objective.repa.weights: file not found: {r.weights}")
    init = cfg.trainer.init_from
    if init and not init.startswith("s3://"):  # an s3:// file is checked when the run starts
        if not os.path.isfile(init):
            errs.append(f"trainer.init_from: file not found: {init} (a dip_scale model file: an EMA export or "
                        "dip-import-released's output)")
        else:
            errs.extend(init_from_problems(init, cfg.model))
    if ev.backend == "local":  # a Kubernetes Job reads its files inside its own image / from S3
        for key, maker in (("inception_weights", "the real file, or dip-standin-inception for a stand-in"),
                           ("reference_stats", "dip-fid-stats")):
            path = getattr(ev, key)
            if path and not path.startswith("s3://") and not os.path.isfile(path):
                errs.append(f"eval.{key}: file not found: {path} ({maker}; tools/demo.py makes the demo's; "
                            "eval.backend=none runs without evaluation)")
    return errs


def init_from_problems(path: str, model: ModelConfig) -> list[str]:
    """Why the model file at a local `path` cannot start a run of `model` (empty: it can)."""
    from dip_scale.models.export import read_model_header
    from dip_scale.models.spec import architecture_differences

    try:
        stored, _ = read_model_header(path)
    except (ValueError, ConfigError) as e:
        return [f"trainer.init_from: {e}"]
    diff = architecture_differences(stored, model)
    if diff:
        return [f"trainer.init_from: {path} holds another architecture than model: ({'; '.join(diff)}; file != config)"]
    return []


def load_config_or_exit(argv: list[str], usage: str, check_files: bool = False) -> ExperimentConfig:
    """Command-line front door: `CONFIG.yaml [key.path=value ...]` -> a validated config, or the
    usage / one-paragraph error on stderr and exit status 2 (never a traceback). `check_files`:
    also require the run's local input files (missing_files)."""
    if "-h" in argv or "--help" in argv:
        print(f"{usage}\n\n{FRONT_DOOR}")
        raise SystemExit(0)
    path, overrides = split_argv(argv)
    if path is None and not overrides:
        print(f"{usage}\n(--help: the config syntax)", file=sys.stderr)
        raise SystemExit(2)
    try:
        cfg = load_config(path, overrides)
        errors = missing_files(cfg) if check_files else []
        if errors:
            raise ConfigError(f"invalid config in {path}:\n  " + "\n  ".join(errors))
        return cfg
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m dip_scale.config CONFIG [overrides]`: validate and print the resolved config."""
    cfg = load_config_or_exit(sys.argv[1:] if argv is None else argv, "usage: dip-config CONFIG.yaml [key.path=value ...]   (python -m dip_scale.config ...)\n"
                              "Validate a config and print it resolved (base files merged, overrides applied, defaults filled).")
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
