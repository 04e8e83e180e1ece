"""The `kubernetes` eval backend: one batch/v1 Job per evaluation, through the official client.

Training must never wait on (or die of) the cluster, so every call here is short: transient API
trouble (429, 5xx, a dropped connection) is retried with a small backoff and otherwise left for
the next poll; only `check()`, at start-up, turns problems into a ConfigError (with the fix).

A failed Job (its condition `Failed`, e.g. BackoffLimitExceeded or DeadlineExceeded) is created
again under a new name (`...-r1`, `...-r2`: Job names cannot be reused while the failed one is
kept for its logs) up to eval.max_retries times, the reason logged; then it is reported to the
dispatcher. Every Job carries labels naming its run, its evaluation and its attempt, so a
restarted run finds the Jobs of the one before (`started`).

The client's kubernetes package is imported on first use: the `local` backend and the tests
that do not need it never pay for loading it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from dip_scale.config import KubernetesConfig
from dip_scale.eval.jobs import EvalJob
from dip_scale.schema import ConfigError

log = logging.getLogger(__name__)

# Where a pod's service account (token, ca.crt, namespace) is mounted; a module constant so tests
# can point it elsewhere (the client's own in-cluster loader reads fixed paths).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RBAC_FILE = "docker/k8s/base/rbac.yaml"
TRAINER_SERVICE_ACCOUNT = "dip-scale-trainer"  # the ServiceAccount rbac.yaml grants
APP, RUN_LABEL, EVAL_LABEL, ATTEMPT_LABEL = "dip-scale-eval", "dip-scale/run", "dip-scale/eval", "dip-scale/attempt"
BACKOFF_LIMIT = 2  # pod restarts within one Job (node trouble) before the Job counts as failed


def job_name(run_name: str, name: str, attempt: int = 0) -> str:
    """A valid Job name (DNS-1123 label, <= 63 chars), one per (run, evaluation, attempt):
    readable, plus a hash of the exact run name, so runs whose names differ only in case or
    punctuation never share (and 409 on) each other's Jobs. Attempt 0 has no suffix (names of
    runs started before retries existed stay the same); retries end in `-r<attempt>`."""
    suffix = f"-r{attempt}" if attempt else ""
    readable = re.sub(r"[^a-z0-9-]+", "-", f"dip-eval-{run_name}-{name}".lower()).strip("-")
    digest = hashlib.sha256(f"{run_name}/{name}".encode()).hexdigest()[:6]
    return readable[: 63 - 7 - len(suffix)].rstrip("-") + "-" + digest + suffix


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


def _label(value: str) -> str:
    """A label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63].strip("-_.")


def _selector(run_name: str, name: str) -> str:
    return f"app.kubernetes.io/name={APP},{RUN_LABEL}={_label(run_name)},{EVAL_LABEL}={_label(name)}"


def job_manifest(k: KubernetesConfig, run_name: str, job: EvalJob, argv: list[str], attempt: int = 0) -> dict:
    labels = {"app.kubernetes.io/name": APP, RUN_LABEL: _label(run_name), EVAL_LABEL: _label(job.name), ATTEMPT_LABEL: str(attempt)}
    resources: dict = {"requests": {"cpu": k.cpu, "memory": k.memory}, "limits": {"memory": k.memory}}
    if k.gpus:
        resources["limits"]["nvidia.com/gpu"] = k.gpus
    # hardened as docker/k8s/convert-job.yaml (docs/kubernetes.md): any uid works, the job writes
    # only S3 and /tmp; no capability, no privilege escalation, the runtime's seccomp profile
    container = {"name": "eval", "image": k.image, "imagePullPolicy": "IfNotPresent", "command": list(argv),
                 "env": [{"name": "HOME", "value": "/tmp"}], "resources": resources,
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    if k.env_secret:
        container["envFrom"] = [{"secretRef": {"name": k.env_secret}}]
    # the eval needs S3, never the Kubernetes API: no token in its pod
    pod: dict = {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                     "seccompProfile": {"type": "RuntimeDefault"}}}
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(run_name, job.name, attempt), "namespace": pod_namespace(k), "labels": labels,
                     "annotations": {"dip-scale/model-file": job.model_file, "dip-scale/result": job.result}},
        "spec": {"backoffLimit": BACKOFF_LIMIT, "activeDeadlineSeconds": k.active_deadline_seconds,
                 "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def _status(e: Exception) -> int:
    """HTTP status of a failed call; 0 for a connection error (no answer at all)."""
    return int(getattr(e, "status", 0) or 0)


def _transient(e: Exception) -> bool:
    return _status(e) == 0 or _status(e) == 429 or _status(e) >= 500


def _message(e: Exception) -> str:
    """The API's own words (a Status object's message), else the exception's."""
    body = getattr(e, "body", None)
    try:
        return json.loads(body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{getattr(e, 'reason', '') or ''} {body or ''}".strip() or f"{type(e).__name__}: {e}"


def _failure(job: Any) -> Optional[str]:
    """Why a Job (a V1Job) failed for good, None while it has not."""
    st = job.status
    for c in (st.conditions if st else None) or []:
        if c.type == "Failed" and c.status == "True":
            return f"{c.reason or 'Failed'}: {c.message or ''}".strip(": ")
    limit = job.spec.backoff_limit if job.spec and job.spec.backoff_limit is not None else 6
    if st and st.failed and st.failed > limit:
        return f"{st.failed} pods failed (backoffLimit {limit})"
    return None


@dataclass
class _Tracked:
    job: EvalJob
    argv: list[str]
    attempt: int
    name: str
    created: bool = False  # False: the create call has not gone through yet (retried at the next poll)


class KubernetesBackend:
    """Creates, watches and retries the eval Jobs of one run (rank 0 only)."""

    check_budget_s = 20.0  # start-up: give an API server that is restarting a moment
    submit_budget_s = 10.0  # training waits on submit: retry briefly, then leave it to poll()
    request_timeout = (3.0, 10.0)  # (connect, read) seconds of one call
    poll_seconds = 10.0  # finish(wait=True)

    def __init__(self, k: KubernetesConfig, run_name: str, log_dir: str, max_retries: int):
        self.k, self.run_name, self.log_dir, self.max_retries = k, run_name, log_dir, max_retries
        self.namespace = pod_namespace(k)
        self._tracked: list[_Tracked] = []
        self._failed: list[tuple[EvalJob, str]] = []  # refused at create, reported at the next poll
        self._client: Any = None

    # -- connection ------------------------------------------------------------------------
    def _configuration(self):
        """eval.kubernetes.api_server, else in-cluster, else kubeconfig; ConfigError if none."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        c = client.Configuration()
        c.retries = 0  # our own backoff decides; urllib3's would retry silently on top of it
        if self.k.api_server:
            c.host = self.k.api_server.rstrip("/")
            token = os.path.join(SERVICE_ACCOUNT_DIR, "token")
            if c.host.startswith("https://") and os.path.isfile(token):  # never sent in clear text
                with open(token) as f:
                    c.api_key = {"authorization": f"Bearer {f.read().strip()}"}
            return c
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT"):
            for f in ("token", "ca.crt"):
                if not os.path.isfile(os.path.join(SERVICE_ACCOUNT_DIR, f)):
                    raise ConfigError(f"eval.backend kubernetes: running in a cluster but the service account file "
                                      f"{os.path.join(SERVICE_ACCOUNT_DIR, f)} is missing (is automountServiceAccountToken "
                                      f"false on the trainer pod?); mount it, or set eval.kubernetes.api_server")
            try:
                config.incluster_config.InClusterConfigLoader(
                    token_filename=os.path.join(SERVICE_ACCOUNT_DIR, "token"),
                    cert_filename=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")).load_and_set(c)
            except ConfigException as e:
                raise ConfigError(f"eval.backend kubernetes: in-cluster configuration failed: {e}") from None
            return c
        try:
            config.load_kube_config(client_configuration=c)
            return c
        except (ConfigException, OSError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(
                "eval.backend kubernetes: no Kubernetes API to talk to: eval.kubernetes.api_server is not set "
                "(e.g. http://127.0.0.1:8001 with `kubectl proxy`), not running in a cluster (no KUBERNETES_SERVICE_HOST) "
                f"and no usable kubeconfig (~/.kube/config or $KUBECONFIG: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None

    def _apis(self):
        """(BatchV1Api, CoreV1Api), the connection configured on first use."""
        from kubernetes import client

        if self._client is None:
            self._client = client.ApiClient(self._configuration())
        return client.BatchV1Api(self._client), client.CoreV1Api(self._client)

    @property
    def host(self) -> str:
        return self._client.configuration.host if self._client else (self.k.api_server or "?")

    def _call(self, fn: Callable, budget_s: float, *args, **kwargs):
        """fn(*args) with backoff on transient errors for up to budget_s; other errors raise at once."""
        deadline, delay = time.monotonic() + budget_s, 0.5
        while True:
            try:
                return fn(*args, _request_timeout=self.request_timeout, **kwargs)
            except Exception as e:  # ApiException, or urllib3/OS errors: no answer
                if not _is_api_error(e) or not _transient(e) or time.monotonic() + delay > deadline:
                    raise
                log.info("Kubernetes API %s: %s; retrying in %.1fs", self.host, _status(e) or _message(e), delay)
                time.sleep(delay)
                delay *= 2

    # -- EvalBackend -----------------------------------------------------------------------
    def check(self) -> None:
        """Pre-flight: a dry-run create of a representative Job (nothing is stored), so missing
        permissions, a missing namespace or an admission policy fail the run at start-up rather
        than at the first checkpoint, hours in."""
        from dip_scale.naming import Step

        batch, _ = self._apis()
        probe = EvalJob(f"{self.log_dir}/ema/preflight.safetensors", Step(batch=0, epoch=0))
        body = job_manifest(self.k, self.run_name, probe, ["python", "-m", "dip_scale.eval.fid", "--help"])
        try:
            self._call(batch.create_namespaced_job, self.check_budget_s, self.namespace, body, dry_run="All")
        except Exception as e:
            if not _is_api_error(e):
                raise
            status = _status(e)
            if status in (401, 403):
                raise ConfigError(
                    f"eval.backend kubernetes: not allowed to create Jobs in namespace {self.namespace!r} "
                    f"(HTTP {status}: {_message(e)}); apply {RBAC_FILE} there (kubectl apply -n {self.namespace} -f {RBAC_FILE}) "
                    f"and run the trainer pod with serviceAccountName: {TRAINER_SERVICE_ACCOUNT}") from None
            if 400 <= status < 500 and status != 429:
                raise ConfigError(f"eval.backend kubernetes: the API server refused the eval Job in namespace "
                                  f"{self.namespace!r} (HTTP {status}): {_message(e)}") from None
            raise ConfigError(f"eval.backend kubernetes: the Kubernetes API at {self.host} did not answer in "
                              f"{self.check_budget_s:.0f}s of retries: {f'HTTP {status}: ' if status else ''}{_message(e)}") from None

    def submit(self, job: EvalJob, argv: list[str]) -> None:
        if any(t.job == job for t in self._tracked):
            return  # already dispatched by this process
        self._dispatch(job, argv, 0, self.submit_budget_s)

    def poll(self) -> list[tuple[EvalJob, str]]:
        batch, _ = self._apis()
        for t in list(self._tracked):
            if not t.created:  # the API was away when it was submitted
                self._create(t, 0.0)
                continue
            try:
                j = self._call(batch.read_namespaced_job_status, 0.0, t.name, self.namespace)
            except Exception as e:
                if not _is_api_error(e):
                    raise
                if _status(e) != 404:
                    log.debug("reading eval Job %s: %s; next poll", t.name, _message(e))
                    continue
                reason: Optional[str] = "Job deleted"
            else:
                if j.status and j.status.succeeded:
                    self._tracked.remove(t)
                    log.info("eval Job %s succeeded", t.name)  # the dispatcher reads the result file itself
                    continue
                reason = _failure(j)
                if reason is None:
                    continue  # still running
                reason += self._pod_message(t.name)
            self._tracked.remove(t)
            if t.attempt < self.max_retries:
                log.warning("eval %s: Job %s failed (attempt %d of %d): %s; dispatching it again",
                            t.job.name, t.name, t.attempt + 1, self.max_retries + 1, reason)
                self._dispatch(t.job, t.argv, t.attempt + 1, 0.0)
            else:
                log.error("eval %s: Job %s failed, no retries left: %s", t.job.name, t.name, reason)
                self._failed.append((t.job, reason))
        failed, self._failed = self._failed, []
        return failed

    def started(self, job: EvalJob) -> bool:
        """A Job of this run and evaluation exists (its latest attempt) and has not failed for
        good: it is tracked from now on (a restart does not dispatch it twice)."""
        batch, _ = self._apis()
        try:
            items = self._call(batch.list_namespaced_job, 0.0, self.namespace, label_selector=_selector(self.run_name, job.name)).items
        except Exception as e:
            if not _is_api_error(e):
                raise
            log.warning("listing eval Jobs of %s: %s; dispatching it again (an existing Job is left alone)", job.name, _message(e))
            return False
        ours = []
        for j in items:
            attempt = (j.metadata.labels or {}).get(ATTEMPT_LABEL, "")
            if attempt.isdigit() and j.metadata.name == job_name(self.run_name, job.name, int(attempt)):  # labels are truncated: the name is exact
                ours.append((int(attempt), j))
        if not ours:
            return False
        attempt, j = max(ours, key=lambda a: a[0])
        if _failure(j) is not None and attempt >= self.max_retries:
            return False
        if not any(t.job == job for t in self._tracked):
            argv = list(j.spec.template.spec.containers[0].command or [])
            self._tracked.append(_Tracked(job, argv, attempt, j.metadata.name, created=True))
        return True

    def busy(self) -> bool:
        return bool(self._tracked)

    def finish(self, wait: bool) -> None:
        if not wait:
            if self._tracked:
                log.info("%d eval Job(s) run on after training: %s", len(self._tracked), ", ".join(t.name for t in self._tracked))
            return
        while True:
            for job, reason in self.poll():
                log.error("eval %s failed: %s", job.name, reason)
            if not self.busy():
                return
            time.sleep(self.poll_seconds)

    # -- helpers ---------------------------------------------------------------------------
    def _dispatch(self, job: EvalJob, argv: list[str], attempt: int, budget_s: float) -> None:
        t = _Tracked(job, list(argv), attempt, job_name(self.run_name, job.name, attempt))
        os.makedirs(self.log_dir, exist_ok=True)
        stem = job.name if attempt == 0 else f"{job.name}-r{attempt}"
        with open(os.path.join(self.log_dir, f"{stem}.job.yaml"), "w") as f:
            yaml.safe_dump(job_manifest(self.k, self.run_name, job, argv, attempt), f, sort_keys=False)
        self._tracked.append(t)
        self._create(t, budget_s)

    def _create(self, t: _Tracked, budget_s: float) -> None:
        batch, _ = self._apis()
        try:
            self._call(batch.create_namespaced_job, budget_s, self.namespace,
                       job_manifest(self.k, self.run_name, t.job, t.argv, t.attempt))
            log.info("eval Job %s created for %s", t.name, t.job.model_file)
        except Exception as e:
            if not _is_api_error(e):
                raise
            if _status(e) == 409:
                log.info("eval Job %s exists already (dispatched before a restart): left alone", t.name)
            elif _transient(e):
                log.warning("creating eval Job %s at %s: %s; retrying at the next poll", t.name, self.host, _status(e) or _message(e))
                return
            else:
                self._tracked.remove(t)
                self._failed.append((t.job, f"creating Job {t.name} was refused (HTTP {_status(e)}): {_message(e)}"))
                log.error("creating eval Job %s was refused (HTTP %d): %s", t.name, _status(e), _message(e))
                return
        t.created = True

    def _pod_message(self, name: str) -> str:
        """'; pod <p>: <reason> (exit code N): <termination message>' of the Job's first pod
        whose container terminated: what the eval printed last (e.g. the Python error)."""
        _, core = self._apis()
        try:
            pods = self._call(core.list_namespaced_pod, 0.0, self.namespace, label_selector=f"job-name={name}").items
        except Exception as e:
            if not _is_api_error(e):
                raise
            return ""
        for p in sorted(pods, key=lambda p: (p.metadata.creation_timestamp is None, p.metadata.creation_timestamp or 0, p.metadata.name)):
            for cs in (p.status.container_statuses if p.status else None) or []:
                term = cs.state.terminated if cs.state else None
                if term is not None:
                    text = (term.message or "").strip()[-1000:]
                    return f"; pod {p.metadata.name}: {term.reason or 'terminated'} (exit code {term.exit_code})" + (f": {text}" if text else "")
        return ""


def _is_api_error(e: Exception) -> bool:
    """An error of the API call itself (HTTP error status, or no connection), as opposed to a bug."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return isinstance(e, (ApiException, HTTPError, OSError))
