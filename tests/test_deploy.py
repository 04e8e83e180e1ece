"""The shipped Dockerfile and Kubernetes manifests agree with the code and configs they run:
commands parse, files they name exist, names that must match across files do, the example eval
Job is exactly what the dispatcher creates for the paper's run, every manifest and every
kustomize output validates against the Kubernetes API schema (1.31 and newer) and JobSet's, every
pod is hardened, and the failure policies name the exit codes the launcher really returns.

kustomize is rendered here by a small renderer of the subset docker/k8s uses (resources, images,
patches: JSON 6902 and whole-resource deletes, replacements); anything else in a kustomization
makes it fail rather than be ignored, and where a `kubectl` binary is on PATH its output is
compared with `kubectl kustomize`'s."""
from __future__ import annotations

import configparser
import copy
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, composer_launch
from dip_scale.config import KubernetesConfig, load_config
from dip_scale.eval.fid import command
from dip_scale.eval.jobs import EvalJob
from dip_scale.eval.kubernetes import job_manifest
from dip_scale.naming import parse_export
from dip_scale.train import EXIT_CONFIG, EXIT_NONFINITE, EXIT_REFUSED, EXIT_STORAGE

K8S = ROOT / "docker" / "k8s"
MIN_KUBERNETES = (1, 31)  # the oldest release the manifests are checked against (podFailurePolicy is GA there)
JOBSET = "jobset.x-k8s.io/v1alpha2"
JOBSET_ACTIONS_SOURCE = "kubeflow_trainer_api"  # JobSet's API models (generated from its OpenAPI spec)


def _docs(name: str) -> list[dict]:
    path = K8S / name if (K8S / name).exists() else K8S / "base" / name
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _manifest_files() -> list[Path]:
    """Every plain manifest under docker/k8s, kustomizations aside."""
    seen, files = set(), []
    for f in sorted(K8S.rglob("*.yaml")):
        if f.name != "kustomization.yaml" and f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)
    return files


def _kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _id(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# -- a renderer for the kustomize subset docker/k8s uses ---------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches", "replacements"}


def kustomize(directory: Path) -> list[dict]:
    """`kustomize build directory` for resources (files and directories), patches, images and
    replacements, applied in kustomize's order (patches, images, then replacements)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if set(k) - _KUSTOMIZATION_KEYS:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(set(k) - _KUSTOMIZATION_KEYS)}")
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs += kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    ids = [_id(d) for d in docs]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate resources {ids}"
    for patch in k.get("patches", []):
        docs = _patch(docs, patch, directory)
    for image in k.get("images", []):
        _set_image(docs, image)
    for replacement in k.get("replacements", []):
        _replace(docs, replacement)
    return docs


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _selected(doc: dict, selector: dict) -> bool:
    if set(selector) - {"group", "version", "kind", "name"}:
        raise NotImplementedError(f"selector {selector}")
    have = {"group": _group(doc["apiVersion"]), "version": doc["apiVersion"].rpartition("/")[2],
            "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(have[key] == value for key, value in selector.items())


def _patch(docs: list[dict], entry: dict, directory: Path) -> list[dict]:
    if set(entry) - {"patch", "path", "target"}:
        raise NotImplementedError(f"patch options {entry}")
    body = yaml.safe_load(entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text())
    if isinstance(body, list):  # JSON 6902, on the resources the target selects
        targets = [d for d in docs if _selected(d, entry["target"])]
        assert targets, f"patch target {entry['target']} selects nothing"
        for doc in targets:
            _json6902(doc, body)
        return docs
    if body.get("$patch") == "delete" and set(body) == {"$patch", "apiVersion", "kind", "metadata"}:
        kept = [d for d in docs if (d["apiVersion"], _id(d)) != (body["apiVersion"], _id(body))]
        assert len(kept) == len(docs) - 1, f"nothing to delete for {_id(body)}"
        return kept
    raise NotImplementedError("strategic-merge patches other than deleting a whole resource")


def _pointer(path: str) -> list:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"JSON patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
        elif op["op"] == "replace":
            node[key]  # must exist
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[key]
        else:
            raise NotImplementedError(f"JSON patch op {op['op']}")


def _split_image(image: str) -> tuple[str, str]:
    """('registry/name', what follows it: ':tag', '@digest', ':tag@digest' or '')."""
    name, at, digest = image.partition("@")
    base, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        return base, f":{tag}{at}{digest}"
    return name, f"{at}{digest}"


def _containers(node):
    """Every container of every pod template, at any depth (kustomize's images transformer
    looks for `containers` and `initContainers` anywhere, so it reaches into JobSets too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def _set_image(docs: list[dict], entry: dict) -> None:
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise NotImplementedError(f"images entry {entry}")
    for c in _containers(docs):
        name, suffix = _split_image(c["image"])
        if name == entry["name"]:
            if "newTag" in entry or "digest" in entry:  # both: name:tag@digest (the digest is what is pulled)
                suffix = (f":{entry['newTag']}" if "newTag" in entry else "") + (f"@{entry['digest']}" if "digest" in entry else "")
            c["image"] = entry.get("newName", name) + suffix


def _field_path(path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def _step(node, key: str, create: bool):
    if key.startswith("["):  # [name=value]: the list item whose field has that value
        field, _, value = key[1:-1].partition("=")
        (item,) = [i for i in node if i.get(field) == value]
        return item
    if isinstance(node, list):
        return node[int(key)]
    if key not in node and create:
        node[key] = {}
    return node[key]


def _replace(docs: list[dict], r: dict) -> None:
    if set(r) - {"source", "targets"} or set(r["source"]) - {"kind", "name", "group", "version", "fieldPath"}:
        raise NotImplementedError(f"replacement {r}")
    (source,) = [d for d in docs if _selected(d, {k: v for k, v in r["source"].items() if k != "fieldPath"})]
    value = source
    for key in _field_path(r["source"]["fieldPath"]):
        value = _step(value, key, create=False)
    for target in r["targets"]:
        if set(target) - {"select", "fieldPaths", "options"} or set(target.get("options", {})) - {"create"}:
            raise NotImplementedError(f"replacement target {target}")
        create = target.get("options", {}).get("create", False)
        selected = [d for d in docs if _selected(d, target["select"])]
        assert selected, f"replacement target {target['select']} selects nothing"
        for doc in selected:
            for path in target["fieldPaths"]:
                *parents, last = _field_path(path)
                node = doc
                for key in parents:
                    node = _step(node, key, create)
                assert create or last in node, f"{_id(doc)}: {path} does not exist"
                node[last] = copy.deepcopy(value)


def _canonical(docs: list[dict]) -> list[str]:
    return sorted(json.dumps(d, sort_keys=True) for d in docs)


def _render_all() -> dict[str, list[dict]]:
    return {str(d.relative_to(K8S)): kustomize(d) for d in _kustomizations()}


def _pinned_tree(tmp_path: Path, where: str, pin: dict) -> Path:
    """A copy of docker/k8s whose kustomization in `where` pins the image as `pin` says
    (what `kustomize edit set image` writes there)."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, symlinks=True)
    k = yaml.safe_load((tree / where / "kustomization.yaml").read_text())
    k["images"] = [{"name": "dip-scale", **pin}]
    (tree / where / "kustomization.yaml").write_text(yaml.safe_dump(k, sort_keys=False))
    return tree


DIGEST = "sha256:" + "0123456789abcdef" * 4


def _pin_id(where: str, pin: dict) -> str:
    return f"{where}:{'+'.join(k for k in ('newName', 'newTag', 'digest') if k in pin)}"


PINS = [(".", {"newName": "registry.example.com/ml/dip-scale", "digest": DIGEST}),
        ("base", {"newName": "registry.example.com/ml/dip-scale", "digest": DIGEST}),
        ("base", {"newTag": "0.1.0-rc1"}),
        ("base", {"newName": "registry.example.com/ml/dip-scale", "newTag": "0.1.0", "digest": DIGEST}),
        ("overlays/jobset", {"newName": "registry.example.com/ml/dip-scale", "digest": DIGEST})]


# -- workloads: the pods in a rendered or plain manifest ----------------------------------------

def _job_specs(doc: dict) -> list[dict]:
    """The batch/v1 Job specs a resource stands for (a Job's own, or each of a JobSet's children)."""
    if doc["kind"] == "Job":
        return [doc["spec"]]
    if doc["kind"] == "JobSet":
        return [rj["template"]["spec"] for rj in doc["spec"]["replicatedJobs"]]
    return []


def _train_pod(docs: list[dict]) -> dict:
    (spec,) = [s for d in docs for s in _job_specs(d) if s["template"]["spec"].get("serviceAccountName")]
    return spec


# -- schemas --------------------------------------------------------------------------------

def _kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    versions = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= MIN_KUBERNETES},
                      key=lambda v: tuple(map(int, v.split("."))))
    assert versions, "kubernetes-validate ships no schema for Kubernetes >= 1.31"
    return versions


def _validate_kubernetes(doc: dict, where: str) -> None:
    """Strict (no unknown field anywhere) against every Kubernetes release from 1.31 that the
    installed kubernetes-validate knows."""
    import kubernetes_validate

    for version in _kubernetes_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{where}: {_id(doc)} is invalid for Kubernetes {version} at {path}: {e.message}")


@lru_cache(maxsize=1)
def _jobset_schema() -> dict:
    """JSON schema of JobSet v1alpha2 from its OpenAPI models (kubeflow-trainer-api), made
    strict: no unknown field at any level. The child Job template is left open here; it is
    validated as a batch/v1 Job against the Kubernetes schemas instead."""
    from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet

    schema = JobsetV1alpha2JobSet.model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    schema["$defs"]["IoK8sApiBatchV1JobTemplateSpec"] = {"type": "object"}
    return schema


def _jobset_actions() -> set[str]:
    from kubeflow_trainer_api.models.jobset_v1alpha2_failure_policy_rule import JobsetV1alpha2FailurePolicyRule

    text = JobsetV1alpha2FailurePolicyRule.model_fields["action"].description
    actions = set(re.search(r"Valid values are ([A-Za-z, ]+)\.", text).group(1).replace(" ", "").split(","))
    assert {"FailJobSet", "RestartJobSet"} <= actions, text
    return actions


def _validate_jobset(doc: dict, where: str) -> None:
    import jsonschema

    assert doc["apiVersion"] == JOBSET, where
    errors = [jsonschema.exceptions.best_match([e]) for e in jsonschema.Draft202012Validator(_jobset_schema()).iter_errors(doc)]
    assert not errors, f"{where}: {_id(doc)}: " + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    for rule in doc["spec"].get("failurePolicy", {}).get("rules", []):
        assert rule["action"] in _jobset_actions(), rule
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"]), rule  # the CRD's pattern
    for i, rj in enumerate(doc["spec"]["replicatedJobs"]):
        if "template" in rj["template"].get("spec", {}):  # a complete child (not the skeleton kustomize fills in)
            job = {"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": f"{doc['metadata']['name']}-{rj['name']}-0", **rj["template"].get("metadata", {})},
                   "spec": rj["template"]["spec"]}
            _validate_kubernetes(job, f"{where}: {_id(doc)} replicatedJobs[{i}]")


def _validate(doc: dict, where: str) -> None:
    if doc["apiVersion"] == JOBSET:
        _validate_jobset(doc, where)
    else:
        _validate_kubernetes(doc, where)


# -- the tests --------------------------------------------------------------------------------

def test_every_manifest_is_well_formed():
    files = _manifest_files()
    assert {f.name for f in files} >= {"train-job.yaml", "convert-job.yaml", "eval-job.yaml", "rbac.yaml", "s3-secret.example.yaml", "jobset.yaml"}
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                assert doc["apiVersion"] and doc["kind"] and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), f
    # the paths the code names (the RBAC file in its errors) exist
    from dip_scale.eval.kubernetes import RBAC_FILE

    assert (ROOT / RBAC_FILE).is_file()


def test_every_manifest_validates_against_the_kubernetes_schema():
    for f in _manifest_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                _validate(doc, str(f.relative_to(ROOT)))


def test_every_kustomization_renders_and_validates():
    rendered = _render_all()
    assert set(rendered) >= {".", "base", "overlays/jobset"}
    for where, docs in rendered.items():
        assert docs, where
        for doc in docs:
            _validate(doc, f"kustomize build docker/k8s/{where}")
    # what `kubectl apply -k docker/k8s` creates: the training stack and nothing else
    assert sorted(map(_id, rendered["."])) == ["Job/dip-xl16", "Role/dip-scale-eval-dispatch", "RoleBinding/dip-scale-eval-dispatch",
                                              "Service/dip-xl16", "ServiceAccount/dip-scale-trainer"]
    assert sorted(map(_id, rendered["overlays/jobset"])) == ["JobSet/dip-xl16", "Role/dip-scale-eval-dispatch",
                                                            "RoleBinding/dip-scale-eval-dispatch", "ServiceAccount/dip-scale-trainer"]
    assert not any(d["kind"] == "Secret" for docs in rendered.values() for d in docs)  # placeholders never overwrite real Secrets


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH to compare the renderer with")
@pytest.mark.parametrize("pin", [None, *PINS], ids=["as-shipped", *(_pin_id(*p) for p in PINS)])
def test_the_renderer_agrees_with_kubectl_kustomize(pin, tmp_path):
    tree = K8S if pin is None else _pinned_tree(tmp_path, *pin)
    for directory in sorted(p.parent for p in tree.rglob("kustomization.yaml")):
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert _canonical(kustomize(directory)) == _canonical(theirs), directory


@pytest.mark.parametrize("where, pin", PINS, ids=[_pin_id(*p) for p in PINS])
def test_a_pinned_image_reaches_the_trainer_and_the_eval_jobs_it_creates(where, pin, tmp_path):
    tree = _pinned_tree(tmp_path, where, pin)
    want = pin.get("newName", "dip-scale") + (f":{pin['newTag']}" if "newTag" in pin else "") + (f"@{pin['digest']}" if "digest" in pin else "")
    variants = {".": ["."], "base": [".", "base", "overlays/jobset"], "overlays/jobset": ["overlays/jobset"]}[where]
    for variant in variants:
        spec = _train_pod(kustomize(tree / variant))
        (c,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert c["image"] == env["DIP_SCALE_IMAGE"] == want, variant
        assert c["imagePullPolicy"] == "IfNotPresent"
        argv = shlex.split(c["args"][0].split("exec ", 1)[1].replace("$DIP_SCALE_IMAGE", env["DIP_SCALE_IMAGE"]))
        assert load_config(str(ROOT / argv[4]), argv[5:]).eval.kubernetes.image == want  # what the eval Jobs run


def test_the_shipped_image_is_the_project_version_never_latest():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    (entry,) = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert entry == {"name": "dip-scale", "newTag": cfg["metadata"]["version"]}
    for f in _manifest_files():
        if f.name == "eval-job.yaml":
            continue  # job_manifest()'s output for the paper YAML as it is (eval.kubernetes.image)
        for c in _containers([d for d in yaml.safe_load_all(f.read_text()) if d]):
            assert c["image"] == f"dip-scale:{cfg['metadata']['version']}" and c["imagePullPolicy"] == "IfNotPresent", f


def _pods(docs: list[dict]):
    for doc in docs:
        for spec in _job_specs(doc):
            if "template" in spec:
                yield doc, spec["template"]["spec"]


_HARDENED = [*(str(f.relative_to(K8S)) for f in _manifest_files() if list(_pods([d for d in yaml.safe_load_all(f.read_text()) if d]))),
             *(f"kustomize:{d.relative_to(K8S)}" for d in _kustomizations())]


@pytest.mark.parametrize("source", _HARDENED)
def test_every_pod_is_hardened(source):
    docs = kustomize(K8S / source.split(":", 1)[1]) if source.startswith("kustomize:") else _docs(source)
    for doc, pod in _pods(docs):
        where = f"{source}: {_id(doc)}"
        assert pod["restartPolicy"] == "Never", where
        assert not pod.get("hostNetwork") and not pod.get("hostIPC") and not pod.get("hostPID"), where
        uses_api = bool(pod.get("serviceAccountName"))  # the trainer creates its eval Jobs through the API
        assert pod.get("automountServiceAccountToken") is uses_api, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}  # what applies: the container's wins
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged") and "procMount" not in sc, where
            added = set(sc.get("capabilities", {}).get("add", []))
            assert added <= ({"IPC_LOCK"} if uses_api else set()), where  # RDMA memory registration, the trainer only
            if added:
                # Kubernetes gives non-root processes no ambient capabilities: added ones need uid 0
                assert not sc.get("runAsNonRoot") and sc.get("runAsUser", 0) == 0, where
            else:
                assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, where


def test_the_train_job_fails_at_once_on_the_exit_codes_no_retry_can_fix():
    """FailJob for exactly train.py's EXIT_CONFIG, EXIT_NONFINITE, EXIT_REFUSED; a transient
    storage outage (EXIT_STORAGE) and crashes are retried; disruptions never use up retries."""
    spec = _train_pod(kustomize(K8S))
    (c,) = spec["template"]["spec"]["containers"]
    rules = spec["podFailurePolicy"]["rules"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    assert fail["onExitCodes"]["operator"] == "In" and fail["onExitCodes"]["containerName"] == c["name"]
    assert sorted(fail["onExitCodes"]["values"]) == sorted({EXIT_CONFIG, EXIT_NONFINITE, EXIT_REFUSED})
    assert EXIT_STORAGE not in fail["onExitCodes"]["values"] and spec["backoffLimit"] > 0
    assert "exec composer" in c["args"][0]  # the container's exit code is the launcher's, not bash's
    convert = _one("convert-job.yaml", "Job")["spec"]
    assert convert["podFailurePolicy"]["rules"] == [rules[0]] and convert["template"]["spec"]["restartPolicy"] == "Never"
    for name in ("convert-job.yaml", "eval-job.yaml"):
        assert _one(name, "Job")["spec"]["activeDeadlineSeconds"] > 0, name  # a hung pod fails instead of holding its node


def test_the_jobset_overlay_is_the_same_run_with_gang_restarts():
    base = _train_pod(kustomize(K8S))
    docs = kustomize(K8S / "overlays" / "jobset")
    (js,) = [d for d in docs if d["kind"] == "JobSet"]
    (rj,) = js["spec"]["replicatedJobs"]
    child = rj["template"]["spec"]
    # the same pods, nodes and exit codes as the Job, except for the rendezvous address
    pod, base_pod = copy.deepcopy(child["template"]), copy.deepcopy(base["template"])
    (c,), (bc,) = pod["spec"]["containers"], base_pod["spec"]["containers"]
    env, base_env = {e["name"]: e.get("value") for e in c["env"]}, {e["name"]: e.get("value") for e in bc["env"]}
    net = js["spec"]["network"]
    assert env.pop("MASTER_ADDR") == f"{js['metadata']['name']}-{rj['name']}-0-0.{net['subdomain']}"  # JobSet's pod DNS name
    base_env.pop("MASTER_ADDR")
    assert env == base_env
    c.pop("env"), bc.pop("env")
    assert pod == base_pod
    assert pod["spec"]["subdomain"] == net["subdomain"] and net["enableDNSHostnames"] and net["publishNotReadyAddresses"]
    assert rj["replicas"] == 1 and {k: child[k] for k in ("completions", "parallelism", "completionMode")} == \
        {k: base[k] for k in ("completions", "parallelism", "completionMode")}
    # one failed pod fails its Job (backoffLimit 0) and JobSet recreates all of them
    assert child["backoffLimit"] == 0 and js["spec"]["failurePolicy"]["maxRestarts"] > 0
    child_rules, base_rules = child["podFailurePolicy"]["rules"], base["podFailurePolicy"]["rules"]
    assert [r.get("onPodConditions") or r.get("onExitCodes") for r in child_rules] == \
        [r.get("onPodConditions") or r.get("onExitCodes") for r in base_rules]
    assert all(r["action"] == "FailJob" for r in child_rules)
    # JobSet tells the child's FailJob rules apart by the Job's failure message, which the Job
    # controller writes as below (pkg/controller/job/pod_failure_policy.go), naming the rule index
    disruption = next(i for i, r in enumerate(child_rules) if r.get("onPodConditions"))
    exit_codes = next(i for i, r in enumerate(child_rules) if r.get("onExitCodes"))
    messages = {disruption: f"Pod ns/dip-xl16-node-0-0-abcde has condition DisruptionTarget matching FailJob rule at index {disruption}",
                exit_codes: f"Container {c['name']} for pod ns/dip-xl16-node-0-1-abcde failed with exit code {EXIT_NONFINITE} "
                            f"matching FailJob rule at index {exit_codes}"}
    actions = {}
    for rule in js["spec"]["failurePolicy"]["rules"]:
        assert rule["onJobFailureReasons"] == ["PodFailurePolicy"]  # batch/v1's reason for a FailJob rule
        (matched,) = [i for i, m in messages.items() if any(re.search(p, m) for p in rule["onJobFailureMessagePatterns"])]
        actions[matched] = rule["action"]
    assert actions == {disruption: "RestartJobSetAndIgnoreMaxRestarts", exit_codes: "FailJobSet"}


def test_train_job_runs_the_paper_config_on_consistent_nodes():
    svc, job = _one("train-job.yaml", "Service"), _one("train-job.yaml", "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    argv = shlex.split(c["args"][0].split("exec ", 1)[1].replace("$DIP_SCALE_IMAGE", env["DIP_SCALE_IMAGE"]))
    assert argv[:3] == ["composer", "-n", "8"] and (ROOT / argv[3]).is_file()
    cfg = load_config(str(ROOT / argv[4]), argv[5:])  # the YAML and its overrides validate
    assert cfg.eval.kubernetes.image == c["image"]  # the eval Jobs run the trainer's image
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
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is True  # only the trainer gets a token
    secret = _one("s3-secret.example.yaml", "Secret")["metadata"]["name"]
    assert secret == KubernetesConfig().env_secret == cfg.eval.kubernetes.env_secret
    assert c["envFrom"] == [{"secretRef": {"name": secret}}]
    assert set(_one("s3-secret.example.yaml", "Secret")["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"}


def _program(command: list[str]):
    """(the module a container command runs, its arguments): `python FILE`, `python -m MODULE`
    or a console script of setup.cfg, resolved in the repository the image is built from."""
    if command[:2] == ["python", "-m"]:
        return importlib.import_module(command[2]), command[3:]
    if command[0] == "python":
        assert (ROOT / command[1]).is_file(), f"{command[1]} is not in the repository"
        spec = importlib.util.spec_from_file_location("program", ROOT / command[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, command[2:]
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.replace(" ", "").split("=", 1) for line in cfg.get("options.entry_points", "console_scripts", fallback="").split("\n") if line.strip())
    assert command[0] in scripts, f"{command[0]} is no console script of setup.cfg"
    return importlib.import_module(scripts[command[0]].split(":")[0]), command[1:]


def test_convert_job_arguments_parse_with_the_converter(tmp_path):
    (c,) = _one("convert-job.yaml", "Job")["spec"]["template"]["spec"]["containers"]
    program, argv = _program(c["command"])
    argv = list(argv)
    converter = program if program.main.__module__ == program.__name__ else importlib.import_module(program.main.__module__)  # past a shim
    src = argv[argv.index("--src") + 1]
    assert src.startswith(c["volumeMounts"][0]["mountPath"])  # the ImageNet volume
    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    argv[argv.index("--src") + 1] = str(tmp_path)  # the converter checks the split folders exist
    args = converter.parse_args(argv)
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


# -- the exit codes, from the real launcher -----------------------------------------------------

def fail_job_codes() -> set[int]:
    (fail,) = [r for r in _train_pod(kustomize(K8S))["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    return set(fail["onExitCodes"]["values"])


@pytest.mark.slow
def test_a_bad_config_under_the_launcher_exits_with_a_fail_job_code():
    start = time.monotonic()
    proc = composer_launch(ROOT / "dip_scale" / "train.py", ROOT / "yamls" / "dip_tiny_cpu.yaml",
                           "deepspeed.zero_optimization.stage=4", timeout=300)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert "deepspeed.zero_optimization.stage" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert EXIT_CONFIG in fail_job_codes() and time.monotonic() - start < 120
