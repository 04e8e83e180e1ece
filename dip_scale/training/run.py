"""Build everything a validated config describes and run composer.Trainer.fit() under DeepSpeed.

Order matters: the process group exists before the streaming loader (streaming would otherwise
create and destroy its own), the DeepSpeed section is checked before anything heavy is built,
and the resume point is resolved on every rank before the Trainer (see training/checkpoint.py).
"""
from __future__ import annotations

import copy
import logging
import os
import sys

import torch

from dip_scale import storage
from dip_scale.config import ConfigError, ExperimentConfig, spread_classes, to_dict, to_yaml

log = logging.getLogger("dip_scale")


def _device_name(requested: str) -> str:
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'gpu' requested but no CUDA device is visible; valid choices here: auto, cpu")
    return requested


def _sample_classes(cfg: ExperimentConfig) -> list[int]:
    if cfg.logging.sample_classes is not None:
        return list(cfg.logging.sample_classes)
    return spread_classes(cfg.model.num_classes)


def train(cfg: ExperimentConfig) -> None:
    from composer import Trainer
    from composer.callbacks import CheckpointSaver, SpeedMonitor
    from composer.devices import DeviceCPU, DeviceGPU
    from composer.optim import ConstantWithWarmupScheduler
    from composer.utils import dist, reproducibility

    from dip_scale.data.streaming import build_train_dataloader, dataset_info, dataset_problems
    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.models import build_model
    from dip_scale.models.summary import summarize
    from dip_scale.training.callbacks import MetricsJSONL, NonFiniteGuard, RunConfig, SampleGrid
    from dip_scale.training.checkpoint import LATEST_FILENAME, SAVE_FILENAME, RestoreRNG, resolve_resume
    from dip_scale.training.composer_model import DiPComposerModel
    from dip_scale.training.deepspeed import precision_for, skip_cpu_shm_op, validate_deepspeed
    from dip_scale.training.ema import EMA

    device_name = _device_name(cfg.trainer.device)
    if not cfg.deepspeed:
        raise ConfigError("deepspeed: the section is empty; dip_scale trains with DeepSpeed (e.g. zero_optimization: {stage: 2})")
    problems = validate_deepspeed(cfg.deepspeed, on_gpu=device_name == "gpu")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    if cfg.trainer.autoresume and not cfg.trainer.save_folder:
        raise ConfigError("trainer.autoresume: true needs trainer.save_folder")
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

    run_dir = cfg.resolved_run_dir
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    log.info("rank %d/%d: run %s, run_dir %s, per-device batch %d", rank, world, cfg.run_name, run_dir, device_batch)

    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg.model)
    repa = None
    if cfg.objective.repa.enabled:
        from dip_scale.diffusion.repa import build_repa

        repa = build_repa(cfg.objective.repa, model.trunk.hidden_size)
        repa.encoder.to(device._device)  # not a submodule: frozen, unsharded, never checkpointed
    objective = FlowMatchingObjective(cfg.objective, cfg.model.num_classes, repa)
    macs = summarize(cfg.model)["gmacs_per_image"] * 1e9
    composer_model = DiPComposerModel(model, objective, macs)
    t = cfg.trainer
    autoresume = t.autoresume if t.autoresume is not None else bool(t.save_folder)
    load_path = resolve_resume(t.save_folder, cfg.run_name, os.path.join(run_dir, "resume")) if autoresume else None
    init_weights = None
    if t.init_from and load_path is None:
        from dip_scale.training.init_from import load_init_weights

        init_weights = load_init_weights(t.init_from, composer_model, cfg.model)  # before DeepSpeed wraps the model
    elif t.init_from:
        log.info("resuming from %s: trainer.init_from (%s) is not used", load_path, t.init_from)

    loader = build_train_dataloader(cfg.data, device_batch_size=device_batch, seed=cfg.seed, cache_dir=os.path.join(run_dir, "mds-cache"))
    info = dataset_info(cfg.data)

    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [p for p in composer_model.parameters() if p.requires_grad],
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
    )
    keep = t.save_num_checkpoints_to_keep
    if t.save_folder and storage.is_s3(t.save_folder) and keep < 0:
        keep = 1  # for an S3 folder this counts the local staging copies only; S3 keeps every checkpoint

    ema = EMA(cfg.ema.decay, cfg.model, t.save_folder, t.save_interval, cfg.run_name)
    ema.export_at_start = init_weights is not None
    rng = RestoreRNG()
    callbacks = [
        NonFiniteGuard(),  # first: stops before anything else records a non-finite step
        ema,
        rng,
        RunConfig(to_dict(cfg)),
        MetricsJSONL(os.path.join(run_dir, "metrics.jsonl"), cfg.logging.metrics_interval),
        SampleGrid(ema, cfg.sampler, cfg.logging.sample_interval, _sample_classes(cfg), cfg.logging.sample_seed,
                   os.path.join(run_dir, "samples"), class_names=[c["name"] for c in info.classes] if info else None),
        SpeedMonitor(window_size=50, gpu_flops_available=cfg.logging.peak_flops),
    ]
    if init_weights is not None:
        from dip_scale.training.init_from import ExactMasters

        callbacks.insert(callbacks.index(ema), ExactMasters(init_weights))  # before the EMA's starting copy
    evals = None
    if cfg.eval.backend != "none":
        from dip_scale.eval.dispatch import EvalDispatch

        evals = EvalDispatch(ema, cfg, run_dir)
        callbacks.insert(callbacks.index(ema) + 1, evals)  # right after the export it evaluates
    skip_cpu_shm_op()
    trainer = Trainer(
        model=composer_model,
        train_dataloader=loader,
        optimizers=optimizer,
        schedulers=ConstantWithWarmupScheduler(t_warmup=opt.warmup),
        step_schedulers_every_batch=True,
        max_duration=t.max_duration,
        device=device,
        precision=precision_for(cfg.deepspeed),
        deepspeed_config=copy.deepcopy(cfg.deepspeed),
        device_train_microbatch_size=micro,
        run_name=cfg.run_name,
        seed=cfg.seed,
        save_folder=t.save_folder,
        save_filename=SAVE_FILENAME,
        save_latest_filename=LATEST_FILENAME,
        save_interval=t.save_interval,
        save_overwrite=True,  # a crash can leave tars newer than the latest pointer; they are rewritten identically
        save_num_checkpoints_to_keep=keep,
        autoresume=False,
        load_path=load_path,
        callbacks=callbacks,
        loggers=[],
        progress_bar=t.progress_bar and rank == 0,
        log_to_console=not t.progress_bar,
        console_log_interval=t.console_log_interval,
        python_log_level=None,
    )
    rng.take_over(trainer)
    for cb in trainer.state.callbacks:
        # Composer polls S3 every 30 s before publishing the "latest" pointer (and once more at the
        # end of fit); a HEAD request per second costs nothing and narrows the window in which
        # complete checkpoints exist without a pointer
        if isinstance(cb, CheckpointSaver):
            cb._symlink_upload_wait_before_next_try_in_seconds = 1.0
    trainer.fit()
    trainer.close()
    if rank == 0 and evals is not None and cfg.eval.wait_at_end:
        evals.wait()
    if rank == 0:
        print(f"\ndone: {cfg.run_name} at batch {trainer.state.timestamp.batch.value}", file=sys.stderr)
        print(f"  metrics:      {os.path.join(run_dir, 'metrics.jsonl')}", file=sys.stderr)
        if ema.exported:
            print(f"  EMA weights:  {ema.exported[-1]}", file=sys.stderr)
        for cb in callbacks:
            if isinstance(cb, SampleGrid) and cb.written:
                print(f"  sample grid:  {cb.written[-1]}", file=sys.stderr)
        if t.save_folder:
            print(f"  checkpoints:  {t.save_folder.replace('{run_name}', cfg.run_name)}", file=sys.stderr)
        if evals is not None and evals.results:
            print(f"  FID curve:    {os.path.join(run_dir, 'fid.png')} (last: {evals.results[-1]['fid']:.3f})", file=sys.stderr)
