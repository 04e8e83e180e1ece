"""The Kubernetes eval backend against a small local Kubernetes API (the endpoints the official
client calls, with the API server's validation of what matters): pre-flight, create, 409, retry
of failed Jobs with their reasons, transient 500s, IPv6 api_server, in-cluster/kubeconfig errors."""
from __future__ import annotations

import logging
import re
import socket

import pytest
import yaml

from dip_scale.config import KubernetesConfig
from dip_scale.eval import kubernetes as kube
from dip_scale.eval.jobs import EvalJob
from dip_scale.naming import Step
from dip_scale.schema import ConfigError
from kube_server import DNS1123, invalid, serve

JOB = EvalJob("s3://b/runs/x/checkpoints/ema/ep3-ba1500.safetensors", Step(batch=1500, epoch=3))
ARGV = ["python", "-m", "dip_scale.eval.fid", JOB.model_file, "--out", JOB.result]


@pytest.fixture
def api(kube_api):
    return kube_api


def _backend(state, tmp_path, max_retries=2, **k) -> kube.KubernetesBackend:
    cfg = KubernetesConfig(namespace="research", api_server=state["url"], **k)
    return kube.KubernetesBackend(cfg, "My_Run.v2", str(tmp_path), max_retries)


def _fail(state, name: str, reason: str, message: str, pod_message: str | None = None) -> None:
    with state["lock"]:
        state["jobs"][name]["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message}]}
        if pod_message is not None:
            state["pods"][name] = [{"metadata": {"name": f"{name}-x7k2p", "creationTimestamp": "2025-01-01T00:00:00Z"},
                                    "status": {"phase": "Failed", "containerStatuses": [{
                                        "name": "eval", "image": "dip-scale:latest", "imageID": "", "ready": False, "restartCount": 0,
                                        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": pod_message}}}]}}]


def test_job_names_manifest_and_rbac():
    name = kube.job_name("My_Run.v2", "ep3-ba1500")
    assert name.startswith("dip-eval-my-run-v2-ep3-ba1500-") and len(name) <= 63
    assert kube.job_name("my-run-v2", "ep3-ba1500") != name  # names differing in case/punctuation never share Jobs
    assert kube.job_name("My_Run.v2", "ep3-ba1500", 1) == name + "-r1"
    long = [kube.job_name("r" * 80, "ep100-ba500400-cfg2.9", a) for a in (0, 1, 12)]
    assert all(len(n) <= 63 and DNS1123.match(n) for n in long) and len(set(long)) == 3
    assert kube.job_name("r" * 80, "ep100-ba500400") != kube.job_name("r" * 79 + "s", "ep100-ba500400")
    m = kube.job_manifest(KubernetesConfig(namespace="ns", active_deadline_seconds=60), "My_Run.v2", JOB, ARGV, attempt=2)
    assert invalid(m) is None and m["spec"]["activeDeadlineSeconds"] == 60
    assert m["metadata"]["labels"][kube.ATTEMPT_LABEL] == "2" and m["metadata"]["name"].endswith("-r2")
    # the trainer's Role grants exactly what the backend calls
    role = next(d for d in yaml.safe_load_all(open("docker/k8s/base/rbac.yaml")) if d["kind"] == "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {("batch", "jobs", "create"), ("batch", "jobs", "list"), ("batch", "jobs/status", "get"), ("", "pods", "list")}


def test_preflight_is_a_dry_run_and_names_rbac_on_403(api, tmp_path):
    backend = _backend(api, tmp_path)
    backend.check()
    assert api["requests"] == [("POST", "/apis/batch/v1/namespaces/research/jobs?dryRun=All")] and api["jobs"] == {}
    api["fail"]["POST"] = [403]
    with pytest.raises(ConfigError, match=r"rbac\.yaml") as e:
        _backend(api, tmp_path).check()
    assert "'research'" in str(e.value) and kube.TRAINER_SERVICE_ACCOUNT in str(e.value) and "\n" not in str(e.value)


def test_preflight_reports_admission_refusals(api, tmp_path):
    with pytest.raises(ConfigError, match="Job is invalid: activeDeadlineSeconds"):
        kube.KubernetesBackend(KubernetesConfig(namespace="research", api_server=api["url"], active_deadline_seconds="1h"),
                               "r", str(tmp_path), 0).check()


def test_submit_creates_the_job_once(api, tmp_path):
    backend = _backend(api, tmp_path, gpus=2)
    backend.submit(JOB, ARGV)
    (name, stored), = api["jobs"].items()
    assert name == kube.job_name("My_Run.v2", JOB.name) and stored["metadata"]["namespace"] == "research"
    (c,) = stored["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ARGV and c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert yaml.safe_load((tmp_path / f"{JOB.name}.job.yaml").read_text())["metadata"]["name"] == name
    restarted = _backend(api, tmp_path)
    restarted.submit(JOB, ARGV)  # a resumed run dispatching again: 409, not an error
    assert len(api["jobs"]) == 1 and [r for r in api["requests"] if r[0] == "POST"] == [("POST", "/apis/batch/v1/namespaces/research/jobs")] * 2
    assert restarted.busy() and restarted.poll() == []  # the existing Job is watched


def test_failed_job_is_retried_then_reported_with_its_reasons(api, tmp_path, caplog):
    backend = _backend(api, tmp_path, max_retries=1)
    backend.submit(JOB, ARGV)
    first = kube.job_name("My_Run.v2", JOB.name)
    assert backend.poll() == [] and backend.busy()  # running
    _fail(api, first, "DeadlineExceeded", "Job was active longer than specified deadline", "CUDA out of memory")
    with caplog.at_level(logging.WARNING, logger=kube.__name__):
        assert backend.poll() == []
    assert "DeadlineExceeded" in caplog.text and "CUDA out of memory" in caplog.text
    second = first + "-r1"
    assert set(api["jobs"]) == {first, second} and api["jobs"][second]["spec"]["template"]["spec"]["containers"][0]["command"] == ARGV
    assert backend.busy() and kube.KubernetesBackend(backend.k, "My_Run.v2", str(tmp_path), 1).started(JOB)  # a restart sees the retry
    _fail(api, second, "BackoffLimitExceeded", "Job has reached the specified backoff limit", "Traceback: ValueError: bad reference")
    (job, reason), = backend.poll()
    assert job == JOB and "BackoffLimitExceeded" in reason and "ValueError: bad reference" in reason and "exit code 1" in reason
    assert not backend.busy() and len(api["jobs"]) == 2
    assert not kube.KubernetesBackend(backend.k, "My_Run.v2", str(tmp_path), 1).started(JOB)  # failed for good
    # succeeded: forgotten, never reported; deleted: a failure
    other = EvalJob(JOB.model_file, JOB.step, cfg_scale=2.9)
    backend.submit(other, ARGV)
    api["jobs"][kube.job_name("My_Run.v2", other.name)]["status"] = {"succeeded": 1}
    assert backend.poll() == [] and not backend.busy()
    third = EvalJob(JOB.model_file, JOB.step, cfg_scale=4.0)
    no_retry = _backend(api, tmp_path, max_retries=0)
    no_retry.submit(third, ARGV)
    del api["jobs"][kube.job_name("My_Run.v2", third.name)]
    assert no_retry.poll() == [(third, "Job deleted")]


def test_transient_500s_on_create_are_retried(api, tmp_path):
    api["fail"]["POST"] = [500, 500]
    backend = _backend(api, tmp_path)
    backend.submit(JOB, ARGV)
    assert list(api["jobs"]) == [kube.job_name("My_Run.v2", JOB.name)] and len(api["requests"]) == 3
    api["fail"]["GET"] = [503]
    assert backend.poll() == [] and backend.busy()  # a failed read: skipped until the next poll


def test_ipv6_api_server(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server, state = serve("::1")
    except OSError as e:
        pytest.skip(f"IPv6 loopback unavailable: {e}")
    try:
        assert state["url"].startswith("http://[::1]:")
        backend = _backend(state, tmp_path)
        backend.check()
        backend.submit(JOB, ARGV)
        assert list(state["jobs"]) == [kube.job_name("My_Run.v2", JOB.name)]
    finally:
        server.shutdown()
        server.server_close()


def test_in_cluster_without_ca_is_a_config_error(tmp_path, monkeypatch):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t0ken")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    backend = kube.KubernetesBackend(KubernetesConfig(), "r", str(tmp_path), 0)
    with pytest.raises(ConfigError, match=r"ca\.crt") as e:
        backend.check()
    assert str(sa / "ca.crt") in str(e.value) and "\n" not in str(e.value) and (e.value.__context__ is None or e.value.__suppress_context__)


def test_no_way_to_the_api_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(ConfigError) as e:
        kube.KubernetesBackend(KubernetesConfig(), "r", str(tmp_path), 0).check()
    msg = str(e.value)
    assert "eval.kubernetes.api_server" in msg and "KUBERNETES_SERVICE_HOST" in msg and "kubeconfig" in msg and "\n" not in msg


def test_unreachable_api_server_is_a_config_error_naming_it(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    backend = kube.KubernetesBackend(KubernetesConfig(api_server=dead), "r", str(tmp_path), 0)
    backend.check_budget_s = 1.0  # retried with backoff, then given up
    with pytest.raises(ConfigError, match=re.escape(dead)):
        backend.check()
