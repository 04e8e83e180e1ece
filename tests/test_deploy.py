"""The shipped Dockerfile and Kubernetes manifests agree with the code and configs they run:
commands parse, files they name exist, names that must match across files do, and the example
eval Job is exactly what the dispatcher creates for the paper's run."""
from __future__ import annotations

import re
import shlex

import yaml

from conftest import ROOT, load_tool
from dip_scale.config import KubernetesConfig, load_config
from dip_scale.eval.fid import command
from dip_scale.eval.jobs import EvalJob
from dip_scale.eval.kubernetes import job_manifest
from dip_scale.naming import parse_export

K8S = ROOT / "docker" / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def test_every_manifest_is_well_formed():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"train-job.yaml", "convert-job.yaml", "eval-job.yaml", "rbac.yaml", "s3-secret.example.yaml"}
    for f in files:
        for doc in _docs(f.name):
            assert doc["apiVersion"] and doc["kind"] and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), f.name


def test_train_job_runs_the_paper_config_on_consistent_nodes():
    svc, job = _one("train-job.yaml", "Service"), _one("train-job.yaml", "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = shlex.split(c["args"][0].split("exec ", 1)[1])
    assert argv[:3] == ["composer", "-n", "8"] and (ROOT / argv[3]).is_file()
    cfg = load_config(str(ROOT / argv[4]), argv[5:])  # the YAML and its overrides validate
    env = {e["name"]: e.get("value") for e in c["env"]}
    key = next(e for e in c["env"] if e["name"] == "DIP_SCALE_CHECKPOINT_KEY")["valueFrom"]["secretKeyRef"]
    assert key == {"name": _one("checkpoint-key.example.yaml", "Secret")["metadata"]["name"], "key": "key", "optional": True}
    nodes = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == nodes
    assert int(env["WORLD_SIZE"]) == 8 * nodes == c["resources"]["limits"]["nvidia.com/gpu"] * nodes
    assert cfg.data.batch_size % int(env["WORLD_SIZE"]) == 0
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["port"] == int(env["MASTER_PORT"])
    assert "NODE_RANK=$JOB_COMPLETION_INDEX" in c["args"][0]
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # the service account may create the per-checkpoint FID Jobs; every pod gets the S3 secret
    rbac = _docs("rbac.yaml")
    (sa,) = [d for d in rbac if d["kind"] == "ServiceAccount"]
    (role,) = [d for d in rbac if d["kind"] == "Role"]
    (binding,) = [d for d in rbac if d["kind"] == "RoleBinding"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    secret = _one("s3-secret.example.yaml", "Secret")["metadata"]["name"]
    assert secret == KubernetesConfig().env_secret == cfg.eval.kubernetes.env_secret
    assert c["envFrom"] == [{"secretRef": {"name": secret}}]
    assert set(_one("s3-secret.example.yaml", "Secret")["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"}


def test_convert_job_arguments_parse_with_the_converter(tmp_path):
    (c,) = _one("convert-job.yaml", "Job")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["python", "tools/convert_imagenet_mds.py"]
    argv = c["command"][2:]
    src = argv[argv.index("--src") + 1]
    assert src.startswith(c["volumeMounts"][0]["mountPath"])  # the ImageNet volume
    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    argv[argv.index("--src") + 1] = str(tmp_path)  # the converter checks the split folders exist
    args = load_tool("convert_imagenet_mds").parse_args(argv)
    assert args.resolution == 256 and args.out.startswith("s3://") and args.splits == ["train", "val"]


def test_example_eval_job_is_what_the_dispatcher_creates_for_the_paper_run():
    cfg = load_config(str(ROOT / "yamls" / "dip_xl16_600ep.yaml"))
    example = _one("eval-job.yaml", "Job")
    (c,) = example["spec"]["template"]["spec"]["containers"]
    model_file = c["command"][3]
    job = EvalJob(model_file, parse_export(model_file.rsplit("/", 1)[1]))
    assert model_file.startswith(cfg.trainer.save_folder.replace("{run_name}", cfg.run_name) + "/ema/")
    made = job_manifest(cfg.eval.kubernetes, cfg.run_name, job, command(model_file, job.result, cfg.eval, cfg.sampler, grid=job.grid))
    assert example["metadata"]["name"] == made["metadata"]["name"]
    (mc,) = made["spec"]["template"]["spec"]["containers"]
    assert c == mc
    for key in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert example["spec"][key] == made["spec"][key]


def test_dockerfile_copies_what_exists_and_bakes_the_weights_the_configs_name():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    weights_dir = re.search(r"^COPY docker/weights/ (\S+)$", text, flags=re.M).group(1).rstrip("/")
    cfg = load_config(str(ROOT / "yamls" / "dip_xl16_600ep.yaml"))
    for path in (cfg.eval.inception_weights, cfg.objective.repa.weights):
        directory, name = path.rsplit("/", 1)
        assert directory == weights_dir and name in text  # checked at build time, by name
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, flags=re.M).group(1))
    assert (ROOT / cmd[3]).is_file() and (ROOT / cmd[4]).is_file()
    assert "DS_BUILD_OPS=0" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored and "runs" in ignored
