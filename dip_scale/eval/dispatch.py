"""Dispatch an FID job for every EMA export (one per checkpoint) and collect the results.

Training never waits on FID (docs/architecture.md, "Checkpoint → export → eval → log"): on rank 0, right after the EMA file of a checkpoint is
written, the `python -m dip_scale.eval.fid ...` command is handed to a backend:

* `local`: a child process on this machine (its own session, so a killed training run does
  not kill it), at most `eval.max_parallel` at a time, the rest queued (what is still queued
  when training ends runs on in the background, unless `eval.wait_at_end`); log in
  `<run_dir>/eval/<checkpoint>.log`.
* `kubernetes`: a batch/v1 Job created through the Kubernetes API (in-cluster service account,
  or `eval.kubernetes.api_server`, e.g. `kubectl proxy`); the manifest is also written to
  `<run_dir>/eval/<checkpoint>.job.yaml`. An existing Job of the same name (a resumed run) is
  left alone.

Each job writes `<save_folder>/eval/<checkpoint>.json` (FID + protocol) and a PNG of its first
samples beside it. The callback polls for those files while training runs, logs `eval/fid` at
the checkpoint's step through Composer's loggers, appends it to `<run_dir>/fid.jsonl` and
redraws `<run_dir>/fid.png`. A resumed run picks up the results of evals dispatched before the
restart and dispatches those that never started.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

import yaml
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale import storage
from dip_scale.config import ConfigError, ExperimentConfig, KubernetesConfig
from dip_scale.eval.fid import command

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class EvalJob:
    model_file: str  # <save_folder>/ema/<stem>.safetensors
    step: int

    @classmethod
    def from_export(cls, path: str) -> Optional["EvalJob"]:
        """The job for an EMA export named ...-ba<step>.safetensors (None for any other file)."""
        m = re.search(r"-ba(\d+)\.safetensors$", path)
        return cls(path, int(m.group(1))) if m else None

    @property
    def stem(self) -> str:
        return os.path.basename(self.model_file).removesuffix(".safetensors")

    @property
    def result(self) -> str:
        return f"{self.model_file.rsplit('/', 2)[0]}/eval/{self.stem}.json"

    @property
    def grid(self) -> str:
        return self.result.removesuffix(".json") + ".png"


class LocalBackend:
    """Child processes on this machine, `max_parallel` at a time, in submission order."""

    def __init__(self, log_dir: str, max_parallel: int):
        self.log_dir = log_dir
        self.max_parallel = max_parallel
        self.queue: list[tuple[EvalJob, list[str]]] = []
        self.running: list[tuple[EvalJob, subprocess.Popen]] = []
        self._unreported: list[EvalJob] = []  # failures seen by submit's poll, for the next poll

    def submit(self, job: EvalJob, argv: list[str]) -> None:
        self.queue.append((job, [sys.executable, *argv[1:]]))  # this interpreter: the same venv
        failed = self.poll()  # (not `self._unreported += self.poll()`: poll swaps that list)
        self._unreported += failed

    def poll(self) -> list[EvalJob]:
        """Reap finished processes and start queued ones; -> jobs that failed since the last poll."""
        failed, self._unreported = self._unreported, []
        for job, proc in list(self.running):
            if proc.poll() is not None:
                self.running.remove((job, proc))
                if proc.returncode:
                    log.warning("eval of %s failed (exit %d); see %s", job.model_file, proc.returncode, self._log(job))
                    failed.append(job)
        while self.queue and len(self.running) < self.max_parallel:
            job, argv = self.queue[0]
            try:
                os.makedirs(self.log_dir, exist_ok=True)
                with open(self._log(job), "w") as out:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=_child_env())
                self._write_pid(job, proc.pid)
            except OSError as e:
                log.error("could not start the eval of %s: %s", job.model_file, e)
                failed.append(job)
                self.queue.pop(0)
                continue
            self.queue.pop(0)
            self.running.append((job, proc))
            log.info("eval of %s started locally (pid %d, log %s)", job.model_file, proc.pid, self._log(job))
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

    def detach_queue(self) -> None:
        """Training is ending without waiting: run what is still queued one after another in a
        background shell that outlives this process."""
        if not self.queue:
            return
        steps = [f"{shlex.join(argv)} > {shlex.quote(self._log(job))} 2>&1" for job, argv in self.queue]
        os.makedirs(self.log_dir, exist_ok=True)
        shell = subprocess.Popen(["sh", "-c", "; ".join(steps)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True, env=_child_env())
        for job, _ in self.queue:
            self._write_pid(job, shell.pid)  # running, as far as a resumed run is concerned
        log.info("%d queued eval(s) continue in the background after training: %s", len(self.queue),
                 ", ".join(self._log(job) for job, _ in self.queue))
        self.queue.clear()

    def _log(self, job: EvalJob) -> str:
        return os.path.join(self.log_dir, f"{job.stem}.log")

    def _pid(self, job: EvalJob) -> str:
        return os.path.join(self.log_dir, f"{job.stem}.pid")

    def _write_pid(self, job: EvalJob, pid: int) -> None:
        with open(self._pid(job), "w") as f:
            f.write(str(pid))


def _child_env() -> dict[str, str]:
    """The eval process is not part of the training job's process group."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def job_name(run_name: str, stem: str) -> str:
    """A valid Job name (DNS-1123 label, <= 63 chars), one per (run, checkpoint): readable, plus a
    hash of the exact run name, so runs whose names differ only in case or punctuation never
    share (and 409 on) each other's Jobs."""
    readable = re.sub(r"[^a-z0-9-]+", "-", f"dip-eval-{run_name}-{stem}".lower()).strip("-")
    digest = hashlib.sha256(f"{run_name}/{stem}".encode()).hexdigest()[:6]
    return readable[: 63 - 7].rstrip("-") + "-" + digest


def pod_namespace(k: KubernetesConfig) -> str:
    """eval.kubernetes.namespace, else the trainer pod's own namespace (where rbac.yaml was
    applied), else 'default'."""
    if k.namespace:
        return k.namespace
    try:
        with open(os.path.join(SERVICE_ACCOUNT_DIR, "namespace")) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def job_manifest(k: KubernetesConfig, run_name: str, job: EvalJob, argv: list[str]) -> dict:
    labels = {"app.kubernetes.io/name": "dip-scale-eval", "dip-scale/run": re.sub(r"[^A-Za-z0-9._-]", "-", run_name)[:63].strip("-_.")}
    resources: dict = {"requests": {"cpu": k.cpu, "memory": k.memory}, "limits": {"memory": k.memory}}
    if k.gpus:
        resources["limits"]["nvidia.com/gpu"] = k.gpus
    container = {"name": "eval", "image": k.image, "command": argv, "resources": resources}
    if k.env_secret:
        container["envFrom"] = [{"secretRef": {"name": k.env_secret}}]
    pod: dict = {"restartPolicy": "Never", "containers": [container]}
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(run_name, job.stem), "namespace": pod_namespace(k), "labels": labels,
                     "annotations": {"dip-scale/model-file": job.model_file, "dip-scale/result": job.result}},
        "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


class KubernetesBackend:
    """Creates one Job per checkpoint through the Kubernetes API (no kubectl needed in the image)."""

    def __init__(self, k: KubernetesConfig, run_name: str, log_dir: str):
        self.k, self.run_name, self.log_dir = k, run_name, log_dir

    def connection(self) -> tuple[str, dict[str, str], Optional[ssl.SSLContext]]:
        headers = {"Content-Type": "application/json"}
        token_file = os.path.join(SERVICE_ACCOUNT_DIR, "token")
        if os.path.isfile(token_file):
            with open(token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        if self.k.api_server:
            return self.k.api_server.rstrip("/"), headers, None
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("eval.backend kubernetes: not running in a cluster (no KUBERNETES_SERVICE_HOST) and "
                               "eval.kubernetes.api_server is not set (e.g. http://127.0.0.1:8001 with `kubectl proxy`)")
        return f"https://{host}:{port}", headers, ssl.create_default_context(cafile=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"))

    def submit(self, job: EvalJob, argv: list[str]) -> None:
        manifest = job_manifest(self.k, self.run_name, job, argv)
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"{job.stem}.job.yaml"), "w") as f:
            yaml.safe_dump(manifest, f, sort_keys=False)
        base, headers, ctx = self.connection()
        url = f"{base}/apis/batch/v1/namespaces/{manifest['metadata']['namespace']}/jobs"
        req = urllib.request.Request(url, data=json.dumps(manifest).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx):  # rank 0 is training: do not block long
                pass
            log.info("eval Job %s created for %s", manifest["metadata"]["name"], job.model_file)
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409 AlreadyExists: dispatched before this run was resumed
                raise RuntimeError(f"creating eval Job {manifest['metadata']['name']} at {url} failed: HTTP {e.code} {e.read()[:500]!r}") from None

    def poll(self) -> list[EvalJob]:
        return []

    def busy(self) -> bool:
        return False

    def started(self, job: EvalJob) -> bool:
        return False  # submitting again is safe: an existing Job answers 409


class EvalDispatch(Callback):
    """Rank 0: one eval job per new EMA export, results polled every `poll_seconds` and logged."""

    def __init__(self, ema, cfg: ExperimentConfig, run_dir: str, poll_seconds: float = 10.0):
        self.ema, self.cfg, self.run_dir, self.poll_seconds = ema, cfg, run_dir, poll_seconds
        ev, log_dir = cfg.eval, os.path.join(run_dir, "eval")
        self.backend = (LocalBackend(log_dir, ev.max_parallel) if ev.backend == "local"
                        else KubernetesBackend(ev.kubernetes, cfg.run_name, log_dir))
        self.pending: list[EvalJob] = []
        self.results: list[dict] = []
        self._failed: list[EvalJob] = []
        self._seen = 0
        self._last_poll = 0.0

        if dist.get_global_rank() == 0:  # before the Trainer is built: a bad setting costs seconds
            ref = cfg.eval.reference_stats
            if storage.is_s3(ref) and not storage.exists(ref):
                raise ConfigError(f"eval.reference_stats: not found: {ref} (tools/make_fid_stats.py writes it)")
            if isinstance(self.backend, KubernetesBackend):
                try:
                    self.backend.connection()
                except RuntimeError as e:
                    raise ConfigError(str(e)) from None

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
        recorded = {r["step"] for r in self._recorded()}
        folder = self.ema.export_path(state).rsplit("/", 1)[0]
        for path in storage.list_keys(folder):
            job = EvalJob.from_export(path)
            if job is None or job.step > state.timestamp.batch.value or job.step in recorded:
                continue
            if self.backend.started(job) or storage.exists(job.result):
                self.pending.append(job)
            else:
                self._submit(job)

    def _submit(self, job: EvalJob) -> None:
        argv = command(job.model_file, job.result, self.cfg.eval, self.cfg.sampler, grid=job.grid)
        try:
            self.backend.submit(job, argv)
            self.pending.append(job)
        except Exception as e:  # noqa: BLE001 - an eval that cannot start must not stop training
            log.error("could not dispatch the eval of %s (%s); training goes on. Run it by hand: %s",
                      job.model_file, e, shlex.join(argv))

    def _dispatch_new(self) -> None:
        for path in self.ema.exported[self._seen:]:
            self._submit(EvalJob.from_export(path) or EvalJob(path, -1))
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
            if isinstance(self.backend, LocalBackend) and not self.cfg.eval.wait_at_end:
                try:
                    self.backend.detach_queue()
                except OSError as e:
                    log.error("could not leave the queued evals running (%s): %s", e,
                              "; ".join(shlex.join(argv) for _, argv in self.backend.queue))

    def wait(self) -> None:
        """After training (rank 0, local backend): let queued evals finish and record them
        (`eval.wait_at_end`; the other ranks have already left)."""
        if not isinstance(self.backend, LocalBackend):
            return
        if self.backend.busy():
            log.info("waiting for %d eval job(s) (eval.wait_at_end)", len(self.pending))
        while self.backend.busy():
            self._failed += self.backend.poll()
            time.sleep(1.0)
        self._collect(None)

    @property
    def _jsonl(self) -> str:
        return os.path.join(self.run_dir, "fid.jsonl")

    def _recorded(self) -> list[dict]:
        from dip_scale.visual import read_jsonl

        return read_jsonl(self._jsonl) if os.path.isfile(self._jsonl) else []

    def _collect(self, logger: Optional[Logger]) -> None:
        self._last_poll = time.time()
        try:
            self._failed += self.backend.poll()
            for job in list(self.pending):
                data = storage.read_bytes(job.result)
                if data is None and job not in self._failed:
                    continue
                self.pending.remove(job)
                if data is not None:
                    self._record(json.loads(data), job, logger)
        except Exception as e:  # noqa: BLE001 - storage hiccup, bad file: look again at the next poll
            log.warning("collecting eval results failed (%s); will retry", e)

    def _record(self, result: dict, job: EvalJob, logger: Optional[Logger]) -> None:
        """One row per step in fid.jsonl: a step evaluated again (a run resumed from before a
        checkpoint re-exports the bitwise-same EMA) replaces its row. Rewritten atomically."""
        from dip_scale.visual import plot_fid

        self.results.append(result)
        if logger is not None:
            logger.log_metrics({"eval/fid": result["fid"]}, step=job.step)
        rows = [r for r in self._recorded() if r["step"] != job.step]
        rows.append({"step": job.step, "fid": result["fid"], "result": job.result})
        storage.write_bytes(self._jsonl, "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])).encode())
        plot_fid({r["step"]: r["fid"] for r in rows}, os.path.join(self.run_dir, "fid.png"), title=self.cfg.run_name)
        log.info("FID %.3f at step %d (%s)", result["fid"], job.step, job.result)
