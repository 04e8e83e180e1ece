"""Dispatch an evaluation for every EMA export (one per checkpoint and guidance scale) and
collect the results.

Training never waits on evaluation (docs/architecture.md, "Checkpoint → export → eval → log"):
on rank 0, right after the EMA file of a checkpoint is written, the
`python -m dip_scale.eval.fid ...` command of each (checkpoint, scale) is handed to a backend
(`eval/jobs.py`'s interface):

* `local`: a child process on this machine (its own session, so a killed training run does
  not kill it), at most `eval.max_parallel` at a time, the rest queued (what is still queued
  when training ends runs on in the background, unless `eval.wait_at_end`); log in
  `<run_dir>/eval/<name>.log`.
* `kubernetes`: a batch/v1 Job per evaluation through the official client (`eval/kubernetes.py`).

A failed evaluation is dispatched again up to `eval.max_retries` times; one that fails for good
is recorded with its reason. Each job writes `<save_folder>/eval/<name>.json` (the metrics + their
protocol) and a PNG of its first samples beside it. The callback polls for those files while
training runs, logs `eval/<metric>` (`eval/cfg<s>/<metric>` in a guidance sweep) at the
checkpoint's step through Composer's loggers, keeps one row per (step, scale) in
`<run_dir>/fid.jsonl` and redraws `<run_dir>/fid.png` (one panel per metric, one line per
scale). A resumed run picks up the results of evals dispatched before the restart and
dispatches those that never started.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale import naming, storage
from dip_scale.config import ConfigError, ExperimentConfig
from dip_scale.eval.fid import command
from dip_scale.eval.jobs import EvalBackend, EvalJob
from dip_scale.eval.metrics import METRICS
from dip_scale.naming import Step, parse_export

log = logging.getLogger(__name__)


class LocalBackend:
    """Child processes on this machine, `max_parallel` at a time, in submission order."""

    def __init__(self, log_dir: str, max_parallel: int, max_retries: int = 0):
        self.log_dir, self.max_parallel, self.max_retries = log_dir, max_parallel, max_retries
        self.queue: list[tuple[EvalJob, list[str]]] = []
        self.running: list[tuple[EvalJob, subprocess.Popen, list[str]]] = []
        self.attempts: dict[EvalJob, int] = {}
        self._unreported: list[tuple[EvalJob, str]] = []  # failures seen by submit's poll, for the next poll

    def check(self) -> None:
        pass  # nothing to reach: a process that cannot start is reported by poll

    def submit(self, job: EvalJob, argv: list[str]) -> None:
        self.queue.append((job, [sys.executable, *argv[1:]]))  # this interpreter: the same venv
        failed = self.poll()  # (not `self._unreported += self.poll()`: poll swaps that list)
        self._unreported += failed

    def poll(self) -> list[tuple[EvalJob, str]]:
        """Reap finished processes (retrying failed ones) and start queued ones; -> jobs that
        failed for good since the last poll, with their reason."""
        failed, self._unreported = self._unreported, []
        for job, proc, argv in list(self.running):
            if proc.poll() is None:
                continue
            self.running.remove((job, proc, argv))
            if proc.returncode:
                reason = f"exit {proc.returncode}: {self._last_line(job)} (log {self._log(job)})"
                if self.attempts.get(job, 0) < self.max_retries:
                    self.attempts[job] = self.attempts.get(job, 0) + 1
                    log.warning("eval %s failed (%s); dispatching it again (%d/%d)", job.name, reason, self.attempts[job], self.max_retries)
                    self.queue.insert(0, (job, argv))
                else:
                    log.warning("eval of %s failed: %s", job.model_file, reason)
                    failed.append((job, reason))
        while self.queue and len(self.running) < self.max_parallel:
            job, argv = self.queue.pop(0)
            try:
                os.makedirs(self.log_dir, exist_ok=True)
                with open(self._log(job), "w") as out:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=_child_env())
                self._write_pid(job, proc.pid)
            except OSError as e:
                log.error("could not start the eval of %s: %s", job.model_file, e)
                failed.append((job, f"could not start: {e}"))
                continue
            self.running.append((job, proc, argv))
            log.info("eval %s started locally (pid %d, log %s)", job.name, proc.pid, self._log(job))
        return failed

    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def started(self, job: EvalJob) -> bool:
        """Still running from before a restart (its process, or the shell running the queue, is
        alive). An eval killed with the run (the launcher kills child trees) counts as not started."""
        try:
            with open(self._pid(job)) as f:
                os.kill(int(f.read().strip()), 0)
            return True
        except (OSError, ValueError):
            return False

    def finish(self, wait: bool) -> None:
        """With `wait`, run everything to its end here; else hand what is still queued to a
        background shell that outlives this process (one after another)."""
        if wait:
            while self.busy():
                self._unreported += self.poll()
                time.sleep(1.0)
            return
        if not self.queue:
            return
        steps = [f"{shlex.join(argv)} > {shlex.quote(self._log(job))} 2>&1" for job, argv in self.queue]
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            shell = subprocess.Popen(["sh", "-c", "; ".join(steps)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=_child_env())
        except OSError as e:
            log.error("could not leave the queued evals running (%s): %s", e, "; ".join(shlex.join(argv) for _, argv in self.queue))
            return
        for job, _ in self.queue:
            self._write_pid(job, shell.pid)  # running, as far as a resumed run is concerned
        log.info("%d queued eval(s) continue in the background after training: %s", len(self.queue),
                 ", ".join(self._log(job) for job, _ in self.queue))
        self.queue.clear()

    def _last_line(self, job: EvalJob) -> str:
        try:
            with open(self._log(job)) as f:
                lines = [line.strip() for line in f if line.strip()]
            return lines[-1][-300:] if lines else "no output"
        except OSError:
            return "no log"

    def _log(self, job: EvalJob) -> str:
        return os.path.join(self.log_dir, f"{job.name}.log")

    def _pid(self, job: EvalJob) -> str:
        return os.path.join(self.log_dir, f"{job.name}.pid")

    def _write_pid(self, job: EvalJob, pid: int) -> None:
        with open(self._pid(job), "w") as f:
            f.write(str(pid))


def _child_env() -> dict[str, str]:
    """The eval process is not part of the training job's process group."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def make_backend(cfg: ExperimentConfig, log_dir: str) -> EvalBackend:
    ev = cfg.eval
    if ev.backend == "local":
        return LocalBackend(log_dir, ev.max_parallel, ev.max_retries)
    from dip_scale.eval.kubernetes import KubernetesBackend

    return KubernetesBackend(ev.kubernetes, cfg.run_name, log_dir, ev.max_retries)


class EvalDispatch(Callback):
    """Rank 0: the evaluations of every new EMA export, results polled every `poll_seconds` and logged."""

    def __init__(self, ema, cfg: ExperimentConfig, run_dir: str, poll_seconds: float = 10.0):
        self.ema, self.cfg, self.run_dir, self.poll_seconds = ema, cfg, run_dir, poll_seconds
        self.backend = make_backend(cfg, os.path.join(run_dir, "eval"))
        self.pending: list[EvalJob] = []
        self.results: list[dict] = []
        self._seen = 0
        self._last_poll = 0.0

        if dist.get_global_rank() == 0:  # before the Trainer is built: a bad setting costs seconds
            ref = cfg.eval.reference_stats
            if storage.is_s3(ref) and not storage.exists(ref):
                raise ConfigError(f"eval.reference_stats: not found: {ref} (dip-fid-stats writes it)")
            self.backend.check()

    @property
    def scales(self) -> list[Optional[float]]:
        return list(self.cfg.eval.cfg_scales) if self.cfg.eval.cfg_scales else [None]

    def jobs_of(self, step: Step, model_file: str) -> list[EvalJob]:
        return [EvalJob(model_file, step, scale) for scale in self.scales]

    def fit_start(self, state: State, logger: Logger) -> None:
        # (an export already made at fit start, the starting point of a fine-tune, is dispatched
        # with the first checkpoint's)
        if dist.get_global_rank() != 0 or state.timestamp.batch.value == 0:
            return
        try:
            self._adopt_earlier(state)
        except Exception as e:  # noqa: BLE001 - evaluation trouble must never stop training
            log.error("could not look for the evals of earlier checkpoints (%s); training goes on", e)

    def _adopt_earlier(self, state: State) -> None:
        # resumed: earlier exports whose result fid.jsonl does not hold yet. Their evals may still
        # be running (own process session / Job): watch for the result. Those never started (a
        # local queue lost with the killed run) are dispatched again; a Job that exists is not.
        recorded = {(r["step"], r.get("cfg_scale")) for r in self._recorded()}
        folder = self.ema.export_path(state).rsplit("/", 1)[0]
        for path in storage.list_keys(folder):  # a folder listing: the one place names are parsed
            step = parse_export(path.rsplit("/", 1)[-1])
            if step is None or step.batch > state.timestamp.batch.value:
                continue
            for job in self.jobs_of(step, path):
                if (step.batch, job.cfg_scale) in recorded:
                    continue
                if self.backend.started(job) or storage.exists(job.result):
                    self.pending.append(job)
                else:
                    self._submit(job)

    def _argv(self, job: EvalJob) -> list[str]:
        sampler = self.cfg.sampler if job.cfg_scale is None else dataclasses.replace(self.cfg.sampler, cfg_scale=job.cfg_scale)
        return command(job.model_file, job.result, self.cfg.eval, sampler, grid=job.grid,
                       save_npz=job.samples_npz if self.cfg.eval.save_npz else None)

    def _submit(self, job: EvalJob) -> None:
        argv = self._argv(job)
        try:
            self.backend.submit(job, argv)
            self.pending.append(job)
        except Exception as e:  # noqa: BLE001 - an eval that cannot start must not stop training
            log.error("could not dispatch the eval of %s (%s); training goes on. Run it by hand: %s",
                      job.model_file, e, shlex.join(argv))

    def _dispatch_new(self) -> None:
        for step, path in self.ema.exported[self._seen:]:
            for job in self.jobs_of(step, path):
                self._submit(job)
        self._seen = len(self.ema.exported)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._dispatch_new()

    epoch_checkpoint = batch_checkpoint

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0 and self.pending and time.time() - self._last_poll >= self.poll_seconds:
            self._collect(logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._dispatch_new()
            self._collect(logger)
            if not self.cfg.eval.wait_at_end:
                self.backend.finish(wait=False)

    def wait(self) -> None:
        """After training (rank 0): let the evals finish and record them (`eval.wait_at_end`; the
        other ranks have already left)."""
        if self.backend.busy():
            log.info("waiting for %d eval job(s) (eval.wait_at_end)", len(self.pending))
        self.backend.finish(wait=True)
        self._collect(None)

    @property
    def _jsonl(self) -> str:
        return os.path.join(self.run_dir, naming.RUN_EVALS)

    def _recorded(self) -> list[dict]:
        from dip_scale.visual import read_jsonl

        return read_jsonl(self._jsonl) if os.path.isfile(self._jsonl) else []

    def _collect(self, logger: Optional[Logger]) -> None:
        self._last_poll = time.time()
        try:
            failed = dict(self.backend.poll())
            for job in list(self.pending):
                data = storage.read_bytes(job.result)
                if data is None and job not in failed:
                    continue
                self.pending.remove(job)
                if data is not None:
                    self._record(json.loads(data), job, logger)
                else:
                    self._record_failure(job, failed[job])
        except Exception as e:  # noqa: BLE001 - storage hiccup, bad file: look again at the next poll
            log.warning("collecting eval results failed (%s); will retry", e)

    def _write_rows(self, job: EvalJob, row: dict) -> None:
        """One row per (step, scale) in fid.jsonl: a step evaluated again (a run resumed from
        before a checkpoint re-exports the bitwise-same EMA) replaces its row. Rewritten atomically."""
        from dip_scale.visual import plot_eval

        key = (job.step.batch, job.cfg_scale)
        rows = [r for r in self._recorded() if (r["step"], r.get("cfg_scale")) != key]
        rows.append({"step": job.step.batch, "cfg_scale": job.cfg_scale, **row})
        rows.sort(key=lambda r: (r["step"], r.get("cfg_scale") or 0.0))
        storage.write_bytes(self._jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
        plot_eval(rows, os.path.join(self.run_dir, naming.RUN_EVAL_PLOT), title=self.cfg.run_name)

    def _record(self, result: dict, job: EvalJob, logger: Optional[Logger]) -> None:
        self.results.append(result)
        values = {k: result[k] for k in METRICS if result.get(k) is not None}
        if logger is not None:
            prefix = "eval/" if job.cfg_scale is None else f"eval/cfg{job.cfg_scale:g}/"
            logger.log_metrics({prefix + k: v for k, v in values.items()}, step=job.step.batch)
        self._write_rows(job, {**values, "result": job.result})
        from dip_scale.eval.fid import format_metrics

        log.info("%s at step %d%s (%s)", format_metrics(result), job.step.batch,
                 "" if job.cfg_scale is None else f", CFG {job.cfg_scale:g}", job.result)

    def _record_failure(self, job: EvalJob, reason: str) -> None:
        log.error("eval of %s failed for good: %s", job.model_file, reason)
        self._write_rows(job, {"failed": reason, "result": job.result})
