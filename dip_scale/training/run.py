"""A training run: validate -> build -> fit -> report (docs/architecture.md, "Training").

Order matters: the process group exists before the streaming loader (streaming would otherwise
create and destroy its own), the DeepSpeed section is checked before anything heavy is built,
and the resume point is resolved and checked on every rank before the model is initialised or
the Trainer built (training/checkpoint.py). A run whose last checkpoint already reached
`trainer.max_duration` trains nothing: it collects and dispatches what evaluation is missing,
reports, and exits 0, so the same command is safe to repeat at any point of a run's life.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dip_scale import naming, storage
from dip_scale.config import ConfigError, ExperimentConfig, spread_classes, to_dict, to_yaml

log = logging.getLogger("dip_scale")


@dataclass
class Runtime:
    """What validation establishes about this process's place in the job."""

    device: Any
    world: int
    rank: int
    device_batch: int
    run_dir: str


@dataclass
class Run:
    """What `build` makes: the Trainer and the callbacks the report reads."""

    trainer: Any
    ema: Any
    evals: Any = None
    grids: list = field(default_factory=list)
    complete: bool = False
    mirror: Any = None  # training/mirror.py: run_dir's artefacts in logging.run_upload


def train(cfg: ExperimentConfig) -> None:
    rt = validate(cfg)
    run = build(cfg, rt)
    if run.complete:
        finish_complete(cfg, rt, run)
    else:
        run.trainer.fit()
    run.trainer.close()
    if rt.rank == 0 and run.evals is not None and cfg.eval.wait_at_end:
        run.evals.wait()
    if run.mirror is not None:
        run.mirror.finish()  # results that arrived after the end of training
    if rt.rank == 0:
        report(cfg, rt, run)


# --------------------------------------------------------------------------------------------
def validate(cfg: ExperimentConfig) -> Runtime:
    """The checks that need this machine (devices, DeepSpeed's own schema, the world size), then
    the process group."""
    from composer.devices import DeviceCPU, DeviceGPU
    from composer.utils import dist

    from dip_scale.data.streaming import dataset_problems
    from dip_scale.training.deepspeed import validate_deepspeed

    device_name = cfg.trainer.device
    if device_name == "auto":
        device_name = "gpu" if torch.cuda.is_available() else "cpu"
    if device_name == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'gpu' requested but no CUDA device is visible; valid choices here: auto, cpu")
    from dip_scale.training.composer_internals import allow_bf16_on_cpu, cpu_bf16_for_tests

    if device_name == "cpu" and cpu_bf16_for_tests():
        log.warning("test-only switch: DeepSpeed bf16 on the CPU")
        allow_bf16_on_cpu()
    problems = validate_deepspeed(cfg.deepspeed, on_gpu=device_name == "gpu" or cpu_bf16_for_tests())
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    problems = dataset_problems(cfg.data, cfg.model)  # the data against the model, before anything is built
    if problems:
        raise ConfigError("invalid data:\n  " + "\n  ".join(problems))
    device = DeviceGPU() if device_name == "gpu" else DeviceCPU()
    dist.initialize_dist(device)  # before the loader: streaming uses this process group
    world, rank = dist.get_world_size(), dist.get_global_rank()
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by the world size {world}")
    device_batch = cfg.data.batch_size // world
    micro = cfg.trainer.device_train_microbatch_size
    if micro is not None and device_batch % micro:
        raise ConfigError(f"trainer.device_train_microbatch_size: {micro} does not divide the per-device batch {device_batch}")
    return Runtime(device=device, world=world, rank=rank, device_batch=device_batch, run_dir=cfg.resolved_run_dir)


# --------------------------------------------------------------------------------------------
def build(cfg: ExperimentConfig, rt: Runtime) -> Run:
    """Resume point, model (+ REPA, + init_from), data, optimiser, callbacks, Trainer."""
    from composer import Trainer
    from composer.optim import ConstantWithWarmupScheduler
    from composer.utils import dist, reproducibility

    from dip_scale.data.streaming import build_train_dataloader, dataset_info
    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.models import build_model
    from dip_scale.models.summary import encoder_macs_per_image, trained_macs_per_image
    from dip_scale.training.callbacks import MetricsJSONL, NonFiniteGuard, RunConfig, SampleGrid
    from dip_scale.training.checkpoint import record_step, resolve_resume
    from dip_scale.training.composer_internals import RestoreRNG, cpu_model_from_proc
    from dip_scale.training.composer_model import DiPComposerModel, TrainingStep
    from dip_scale.training.deepspeed import precision_for, skip_cpu_shm_op
    from dip_scale.training.ema import EMA
    from dip_scale.training.loggers import build_callbacks, build_loggers

    t = cfg.trainer
    os.makedirs(rt.run_dir, exist_ok=True)
    if rt.rank == 0:
        with open(os.path.join(rt.run_dir, naming.RUN_CONFIG), "w") as f:
            f.write(to_yaml(cfg))
    log.info("rank %d/%d: run %s, run_dir %s, per-device batch %d", rt.rank, rt.world, cfg.run_name, rt.run_dir, rt.device_batch)
    autoresume = t.autoresume if t.autoresume is not None else bool(t.save_folder)
    resume_dir = os.path.join(rt.run_dir, "resume")
    resume = None
    if t.save_folder:  # with autoresume off, the folder is still checked: nothing of another run is overwritten
        resume = resolve_resume(t.save_folder, cfg.run_name, resume_dir, resume=autoresume, start_over=t.start_over)
    load_path = resume.load_path if resume else None
    mirror = _run_mirror(cfg, rt, resume.step.batch if resume else 0)  # before anything reads run_dir
    deepspeed_config = copy.deepcopy(cfg.deepspeed)
    if resume is not None and resume.universal:  # written at another world size (training/elastic.py)
        deepspeed_config["checkpoint"] = {**deepspeed_config.get("checkpoint", {}), "load_universal": True}

    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg.model)
    if cfg.model.compile:
        model.compile_trunk(cfg.model.compile_mode)
    repa = None
    if cfg.objective.repa.enabled:
        from dip_scale.diffusion.repa import build_repa

        repa = build_repa(cfg.objective.repa, model.trunk.hidden_size)
        repa.encoder.to(rt.device._device)  # not a submodule: frozen, unsharded, never checkpointed
    objective = FlowMatchingObjective(cfg.objective, cfg.model.num_classes, repa)
    compute = {"trained_gmacs_per_image": trained_macs_per_image(cfg.model, repa) / 1e9}
    if repa is not None:
        compute["repa_encoder_gmacs_per_image"] = encoder_macs_per_image(repa.encoder) / 1e9
    log.info("MFU counts %.2f GMACs/image forward (x3 with backward) of what is trained%s", compute["trained_gmacs_per_image"],
             f"; the frozen REPA encoder's {compute['repa_encoder_gmacs_per_image']:.2f} GMACs/image are not in it" if repa else "")
    composer_model = DiPComposerModel(model, objective, compute["trained_gmacs_per_image"] * 1e9, seed=cfg.seed)
    init_weights = None
    if t.init_from and load_path is None:
        from dip_scale.training.init_from import load_init_weights

        init_weights = load_init_weights(t.init_from, composer_model, cfg.model)  # before DeepSpeed wraps the model
    elif t.init_from:
        log.info("resuming from %s: trainer.init_from (%s) is not used", load_path, t.init_from)

    loader = build_train_dataloader(cfg.data, device_batch_size=rt.device_batch, seed=cfg.seed, cache_dir=os.path.join(rt.run_dir, "mds-cache"))
    info = dataset_info(cfg.data)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [p for p in composer_model.parameters() if p.requires_grad],
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
    )

    ema = EMA(cfg.ema.decay, cfg.model, t.save_folder, t.save_interval, cfg.run_name)
    ema.export_at_start = init_weights is not None
    rng = RestoreRNG()
    grid = SampleGrid(ema, cfg.sampler, cfg.logging.sample_interval, _sample_classes(cfg), cfg.logging.sample_seed,
                      rt.run_dir, class_names=[c["name"] for c in info.classes] if info else None)
    callbacks = [
        TrainingStep(composer_model),
        NonFiniteGuard(),  # first to see a batch's end: stops before anything else records a non-finite step
        ema,
        rng,
        RunConfig({**to_dict(cfg), "compute": compute}),
        MetricsJSONL(os.path.join(rt.run_dir, naming.RUN_METRICS), cfg.logging.metrics_interval, cfg.logging.sample_ids),
        grid,
        *([mirror] if mirror else []),  # after the callbacks that write run_dir's files
        *build_callbacks(cfg),  # SpeedMonitor (always) and the `callbacks:` section
    ]
    if init_weights is not None:
        from dip_scale.training.init_from import ExactMasters

        callbacks.insert(callbacks.index(ema), ExactMasters(init_weights))  # before the EMA's starting copy
    evals = None
    if cfg.eval.backend != "none":
        from dip_scale.eval.dispatch import EvalDispatch

        evals = EvalDispatch(ema, cfg, rt.run_dir)
        callbacks.insert(callbacks.index(ema) + 1, evals)  # right after the export it evaluates
    if t.save_folder:
        def on_saved(state, tar, folder):
            if mirror is not None:
                mirror.checkpoint(state)  # the step's lines and grids are in the mirror before its manifest
            record_step(state, tar, folder)

        callbacks.append(_checkpoint_saver(cfg, on_saved))
    skip_cpu_shm_op()
    cpu_model_from_proc()
    bar = t.progress_bar if t.progress_bar is not None else sys.stderr.isatty()
    trainer = Trainer(
        model=composer_model,
        train_dataloader=loader,
        optimizers=optimizer,
        schedulers=ConstantWithWarmupScheduler(t_warmup=opt.warmup),
        step_schedulers_every_batch=True,
        max_duration=t.max_duration,
        device=rt.device,
        precision=precision_for(cfg.deepspeed),
        deepspeed_config=deepspeed_config,
        device_train_microbatch_size=t.device_train_microbatch_size,
        run_name=cfg.run_name,
        seed=cfg.seed,
        autoresume=False,
        load_path=load_path,
        callbacks=callbacks,
        loggers=build_loggers(cfg, rt.run_dir),
        save_latest_filename=None,  # ours is in the saver; Composer's default would refuse remote_uploader.file_path_format_string
        progress_bar=bar and rt.rank == 0,
        log_to_console=not bar and cfg.loggers.console is None,
        console_log_interval=t.console_log_interval,
        python_log_level=None,
    )
    rng.take_over(trainer)
    if load_path is not None:  # loaded: the checked copies are not needed any more
        dist.barrier()
        if dist.get_local_rank() == 0:
            shutil.rmtree(resume_dir, ignore_errors=True)
    return Run(trainer=trainer, ema=ema, evals=evals, grids=[grid], complete=training_complete(trainer.state), mirror=mirror)


def _run_mirror(cfg: ExperimentConfig, rt: Runtime, resume_step: int):
    """The run mirror (training/mirror.py), run_dir restored from it up to the resume step; None
    without one (logging.run_upload)."""
    from dip_scale.config import run_upload_location
    from dip_scale.training.mirror import RunMirror

    remote = run_upload_location(cfg)
    if remote is None:
        return None
    mirror = RunMirror(rt.run_dir, remote, cfg.run_name, cfg.logging.run_upload_interval)
    mirror.restore(resume_step)
    return mirror


def _checkpoint_saver(cfg: ExperimentConfig, on_saved):
    """Composer's CheckpointSaver as the Trainer would build it from save_folder, plus the
    manifest hook. `overwrite`: after a fallback past a damaged checkpoint, its step is written
    again by the same (deterministic) run."""
    from composer.utils import format_name_with_dist, parse_uri

    from dip_scale.training.composer_internals import RecordingCheckpointSaver

    t = cfg.trainer
    folder = format_name_with_dist(t.save_folder, cfg.run_name)
    backend, _, path = parse_uri(t.save_folder)
    remote = latest_remote = None
    if backend:
        remote = str(Path(path) / naming.SAVE_FILENAME) if path else naming.SAVE_FILENAME
        latest_remote = str(Path(path) / naming.LATEST_FILENAME) if path else naming.LATEST_FILENAME
    keep = t.save_num_checkpoints_to_keep
    if backend and keep < 0:
        keep = 1  # for an S3 folder this counts the local staging copies only; S3 keeps every checkpoint
    return RecordingCheckpointSaver(
        folder=t.save_folder, filename=naming.SAVE_FILENAME, remote_file_name=remote, latest_filename=naming.LATEST_FILENAME,
        latest_remote_file_name=latest_remote, save_interval=t.save_interval, overwrite=True,
        num_checkpoints_to_keep=keep, on_saved=lambda state, tar: on_saved(state, tar, folder),
    )


def training_complete(state) -> bool:
    """Whether the loaded state has reached max_duration (nothing left to train). Composer's
    last checkpoint of an epoch-long run is taken at the epoch's last batch, before the epoch
    counter moves on: that counts as the end of the epoch."""
    from composer.core import TimeUnit

    max_d = state.max_duration
    done = state.timestamp.get(max_d.unit)
    if max_d <= done:
        return True
    return (max_d.unit == TimeUnit.EPOCH and state.dataloader_len is not None and int(state.timestamp.batch_in_epoch) > 0
            and int(state.timestamp.batch_in_epoch) >= int(state.dataloader_len) and done.value + 1 >= max_d.value)


def finish_complete(cfg: ExperimentConfig, rt: Runtime, run: Run) -> None:
    """A rerun of a finished run: what the end of a run does, without training."""
    state = run.trainer.state
    if rt.rank == 0:
        print(f"run {cfg.run_name} is complete at {state.timestamp.get(state.max_duration.unit)} "
              f"(trainer.max_duration {cfg.trainer.max_duration}); nothing to train", file=sys.stderr)
    if run.evals is not None:  # collect earlier results, dispatch exports that never got an eval
        run.evals.fit_start(state, run.trainer.logger)
        run.evals.fit_end(state, run.trainer.logger)


def _sample_classes(cfg: ExperimentConfig) -> list[int]:
    if cfg.logging.sample_classes is not None:
        return list(cfg.logging.sample_classes)
    return spread_classes(cfg.model.num_classes)


# --------------------------------------------------------------------------------------------
def report(cfg: ExperimentConfig, rt: Runtime, run: Run) -> None:
    """Where everything the run made is (rank 0)."""
    t = cfg.trainer
    folder = t.save_folder.replace("{run_name}", cfg.run_name) if t.save_folder else None
    print(f"\ndone: {cfg.run_name} at batch {run.trainer.state.timestamp.batch.value}", file=sys.stderr)
    print(f"  metrics:      {os.path.join(rt.run_dir, naming.RUN_METRICS)}", file=sys.stderr)
    exported = run.ema.exported[-1][1] if run.ema.exported else _latest_export(folder)
    if exported:
        print(f"  EMA weights:  {exported}", file=sys.stderr)
    written = [g.written[-1] for g in run.grids if g.written] or _latest_grid(rt.run_dir)
    if written:
        print(f"  sample grid:  {written[-1]}", file=sys.stderr)
    if folder:
        print(f"  checkpoints:  {folder}", file=sys.stderr)
    if run.evals is not None and run.evals.results:
        print(f"  FID curve:    {os.path.join(rt.run_dir, naming.RUN_EVAL_PLOT)} (last: {run.evals.results[-1]['fid']:.3f})", file=sys.stderr)


def _latest_grid(run_dir: str) -> list[str]:
    """The newest sample grid in run_dir (one written before a resume), as a list of 0 or 1."""
    folder = os.path.join(run_dir, naming.SAMPLES_DIR)
    steps = naming.grid_steps(os.listdir(folder) if os.path.isdir(folder) else [])
    return [os.path.join(run_dir, naming.grid(steps[-1]))] if steps else []


def _latest_export(folder: Optional[str]) -> Optional[str]:
    if not folder:
        return None
    steps = {}
    for path in storage.list_keys(storage.join(folder, naming.EMA_DIR)):
        step = naming.parse_export(path.rsplit("/", 1)[-1])
        if step is not None:
            steps[step] = path
    return steps[max(steps)] if steps else None
