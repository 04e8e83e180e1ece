"""Resume under damage and attack, under the real launcher (2 processes), locally and through a
moto S3 server: checkpoints uploaded through an S3 outage, a missing pointer, a truncated latest
tar, a tar with a member that climbs out of its folder, a forged tar under authentication; a
folder of another run state; a finished run started again (and extended); object storage that
does not answer."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, env_with_repo_on_path, free_port
from dip_scale import naming
from training_helpers import FlakyProxy, assert_matches_clean, at_step, kill_when, launch, logs, losses, run, tiny_overrides, wait

pytestmark = pytest.mark.slow
KEY = {"DIP_SCALE_CHECKPOINT_KEY": "a-secret-from-a-kubernetes-secret"}
SOURCE_END, TARGET = 30, 40  # sources stop at 30 (checkpoints 10, 20, 30); the cases restart their
# command (to 30), the extended rerun continues to 40


class Planted:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_tar(data: bytes, *, add: dict[str, bytes] = None, replace: dict[str, bytes] = None) -> bytes:
    """A copy of a tar with members added or replaced."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            body = src.extractfile(m).read() if m.isfile() else None
            if replace and m.name in replace:
                body = replace[m.name]
                m.size = len(body)
            dst.addfile(m, io.BytesIO(body) if body is not None else None)
        for name, body in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


class Folder:
    """A save folder, local or a prefix on S3, with the few operations the cases need."""

    def __init__(self, url: str, s3=None):
        self.url, self.s3 = url, s3

    def _key(self, name):
        return self.url.split("/", 3)[3] + "/" + name

    def names(self) -> list[str]:
        if self.s3 is None:
            return sorted(str(p.relative_to(self.url)) for p in Path(self.url).rglob("*") if p.is_file() or p.is_symlink())
        res = self.s3["client"].list_objects_v2(Bucket=self.s3["bucket"], Prefix=self._key(""))
        return sorted(o["Key"][len(self._key("")):] for o in res.get("Contents", []))

    def read(self, name) -> bytes:
        if self.s3 is None:
            return (Path(self.url) / name).read_bytes()
        return self.s3["client"].get_object(Bucket=self.s3["bucket"], Key=self._key(name))["Body"].read()

    def write(self, name, data: bytes) -> None:
        if self.s3 is None:
            (Path(self.url) / name).write_bytes(data)
        else:
            self.s3["client"].put_object(Bucket=self.s3["bucket"], Key=self._key(name), Body=data)

    def delete(self, name) -> None:
        if self.s3 is None:
            os.remove(Path(self.url) / name)
        else:
            self.s3["client"].delete_object(Bucket=self.s3["bucket"], Key=self._key(name))

    def copy_to(self, url: str) -> "Folder":
        if self.s3 is None:
            shutil.copytree(self.url, url, symlinks=True)
        else:
            for name in self.names():  # get + put: moto's copy_object garbles the checksums of multipart uploads
                Folder(url, self.s3).write(name, self.read(name))
        return Folder(url, self.s3)

    def tar(self, step: int, rank: int) -> str:
        (name,) = [n for n in self.names() if n.endswith(f"-ba{step}-rank{rank}.tar")]
        return name

    def set_tar(self, step: int, rank: int, data: bytes) -> None:
        """Replace a tar and record its new size and sha256 in the manifest (what someone who
        can write the folder but does not hold the key can do); the HMAC stays as it was."""
        name = self.tar(step, rank)
        self.write(name, data)
        manifest_name = name.rsplit("-rank", 1)[0] + ".manifest.json"
        manifest = json.loads(self.read(manifest_name))
        manifest["tars"][name].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.write(manifest_name, json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def local_source(tiny_mds, tmp_path_factory):
    """30 steps of the clean run's configuration (so its checkpoints are the clean run's), with
    authentication on, killed (-9) a few steps past its first checkpoint and restarted: the
    cases below start from a run that came through a kill."""
    root = tmp_path_factory.mktemp("source-local")
    args = tiny_overrides(tiny_mds, root / "run", str(root / "ckpt"), **{"trainer.max_duration": f"{SOURCE_END}ba"})
    env = env_with_repo_on_path(**KEY)
    proc = launch(args, cwd=root, env=env)
    kill_when(proc, lambda: os.path.lexists(root / "ckpt" / "latest-rank1.tar") and max(losses(root / "run") or [0]) > 10)
    killed_at = max(losses(root / "run"))
    resumed_from = naming.parse_tar(os.readlink(root / "ckpt" / "latest-rank0.tar").rsplit("/", 1)[-1])[0].batch
    run(args, cwd=root, env=env, log="resume")
    return {"root": root, "killed_at": killed_at, "resumed_from": resumed_from}


def test_a_run_killed_9_past_a_checkpoint_resumes_exactly(clean_run, local_source):
    """Losses after the resume point and the EMA export equal the uninterrupted run's bitwise;
    metrics.jsonl reads like one run."""
    root = local_source["root"]
    assert local_source["resumed_from"] < local_source["killed_at"] < SOURCE_END  # killed mid-run, past its last checkpoint
    assert_matches_clean(clean_run, root / "run", at_step(root / "ckpt", "ema/ep*-ba{step}.safetensors", SOURCE_END),
                         local_source["resumed_from"], last=SOURCE_END)


@pytest.fixture(scope="module")
def s3_source(tiny_mds, tmp_path_factory, s3_server):
    """The same run with its save folder on S3, through a proxy that drops every connection for
    4 s while the first checkpoint uploads: the resume cases below then start from checkpoints
    that came through an outage."""
    from conftest import S3_ENV

    import boto3

    env = dict(S3_ENV, S3_ENDPOINT_URL=s3_server["endpoint"], AWS_ENDPOINT_URL=s3_server["endpoint"])
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"resume-matrix-{os.getpid()}"
    client.create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("source-s3")
    proxy = FlakyProxy(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    flaky = f"http://127.0.0.1:{proxy.port}"
    (root / "tmp").mkdir()
    proc = launch(tiny_overrides(tiny_mds, root / "run", f"s3://{bucket}/source", **{"trainer.max_duration": f"{SOURCE_END}ba"}),
                  cwd=root, env=env_with_repo_on_path(**{**env, **KEY, "S3_ENDPOINT_URL": flaky, "AWS_ENDPOINT_URL": flaky,
                                                         "TMPDIR": str(root / "tmp")}))
    assert proxy.upload_seen.wait(300), logs(root)
    proxy.outage(4.0)
    assert wait(proc, 600) == 0, logs(root)
    return {"root": root, "s3": {"client": client, "bucket": bucket, "env": env}, "dropped": proxy.dropped}


def test_an_s3_outage_during_a_checkpoint_upload_loses_nothing(s3_source):
    """The run retried through refused connections and finished; the last checkpoint has every
    rank's tar complete on S3 and each checkpoint its EMA export (the cases below resume from them).
    The checkpoints' local staging copies are gone from the machine's temp folder."""
    assert s3_source["dropped"] > 0  # it really met refused connections
    folder = Folder(f"s3://{s3_source['s3']['bucket']}/source", s3_source["s3"])
    assert sorted(losses(s3_source["root"] / "run")) == list(range(1, SOURCE_END + 1))
    pointer = folder.read("latest-rank0.tar.symlink").decode()
    assert pointer.endswith(folder.tar(SOURCE_END, 0))
    for r in (0, 1):
        with tarfile.open(fileobj=io.BytesIO(folder.read(folder.tar(SOURCE_END, r)))) as t:
            assert t.getmembers()
    assert all(_final_ema(folder, step) for step in range(10, SOURCE_END + 1, 10))
    assert not [p for p in (s3_source["root"] / "tmp").rglob("*") if p.is_file() and ".tar" in p.name]


def _case(backend: str, name: str, local_source, s3_source, tmp_path) -> tuple[Folder, Path, dict]:
    """A copy of the source run (save folder and run folder) for one case."""
    if backend == "local":
        folder = Folder(str(local_source["root"] / "ckpt")).copy_to(str(tmp_path / "ckpt"))
        shutil.copytree(local_source["root"] / "run", tmp_path / "run")
        return folder, tmp_path / "run", {}
    s3 = s3_source["s3"]
    folder = Folder(f"s3://{s3['bucket']}/source", s3).copy_to(f"s3://{s3['bucket']}/{name}")
    shutil.copytree(s3_source["root"] / "run", tmp_path / "run")
    return folder, tmp_path / "run", s3["env"]


def _resume(folder: Folder, run_dir: Path, tiny_mds, tmp_path, env: dict, key: bool = True):
    """The source's own command again (what a restarted pod runs)."""
    env = env_with_repo_on_path(**env, **(KEY if key else {}))
    proc = launch(tiny_overrides(tiny_mds, run_dir, folder.url, **{"trainer.max_duration": f"{SOURCE_END}ba"}), cwd=tmp_path, env=env, log="resume")
    return wait(proc, 600), (tmp_path / "resume.launcher.log").read_text() + "".join(p.read_text() for p in tmp_path.glob("resume-rank*.err"))


def _final_ema(folder: Folder, step: int) -> bytes:
    (name,) = [n for n in folder.names() if n.startswith("ema/") and n.endswith(f"-ba{step}.safetensors")]
    return folder.read(name)


BACKENDS = ["local", "s3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_complete_one_used(backend, clean_run, local_source, s3_source, tiny_mds, tmp_path):
    """No `latest` pointer (a hint only: the restart lists the folder) and the newest step's rank-1
    tar cut short: the cut is reported by name and the run continues exactly from step 20."""
    folder, run_dir, env = _case(backend, "truncated", local_source, s3_source, tmp_path)
    for name in folder.names():  # and the newest EMA export gone: the one compared below is the restart's
        if name.startswith("latest-rank") or (name.startswith("ema/") and name.endswith(f"-ba{SOURCE_END}.safetensors")):
            folder.delete(name)
    name = folder.tar(SOURCE_END, 1)
    folder.write(name, folder.read(name)[:50_000])
    rc, out = _resume(folder, run_dir, tiny_mds, tmp_path, env)
    assert rc == 0, out
    assert name in out and "cut short" in out  # reported by name
    assert "resuming from" in out and "-ba20" in out.split("resuming from")[1].splitlines()[0]
    assert_matches_clean(clean_run, run_dir, _final_ema(folder, SOURCE_END), 20, last=SOURCE_END)  # step 30 retrained


def test_a_tar_member_outside_the_checkpoint_is_refused(local_source, tiny_mds, tmp_path):
    """Without a key only the member check stands: refused before extraction, nothing written.
    (The checks run on the local copy a restart makes of each tar, whatever the backend.)"""
    folder, run_dir, env = _case("local", "escape", local_source, None, tmp_path)
    member = "../../escaped.txt"
    folder.set_tar(SOURCE_END, 0, _rewrite_tar(folder.read(folder.tar(SOURCE_END, 0)), add={member: b"written outside"}))
    before = {n: folder.read(n) for n in folder.names()}
    rc, out = _resume(folder, run_dir, tiny_mds, tmp_path, env, key=False)
    assert rc == 5, out
    assert "checkpoint refused" in out and member in out and "outside the checkpoint" in out
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    assert {n: folder.read(n) for n in folder.names()} == before  # nothing written, nothing lost


def test_a_forged_checkpoint_in_the_bucket_is_refused_before_anything_is_unpickled(s3_source, tiny_mds, tmp_path):
    """Someone who can write the bucket but does not hold the key replaces a tar (size and sha256
    in the manifest made consistent): the HMAC refuses it before Composer unpickles a byte."""
    folder, run_dir, env = _case("s3", "forged", None, s3_source, tmp_path)
    marker = tmp_path / "planted-code-ran"
    name = folder.tar(SOURCE_END, 0)
    forged = _rewrite_tar(folder.read(name), replace={"composer_states.pt": pickle.dumps(Planted(str(marker)))})
    folder.set_tar(SOURCE_END, 0, forged)
    before = {n: folder.read(n) for n in folder.names()}
    rc, out = _resume(folder, run_dir, tiny_mds, tmp_path, env)
    assert rc == 5, out
    assert "checkpoint refused" in out and name in out and "authentication tag does not match" in out
    assert not marker.exists()
    assert {n: folder.read(n) for n in folder.names()} == before


def test_a_folder_of_another_run_state_is_an_error_unless_starting_over(local_source, tiny_mds, tmp_path):
    folder, run_dir, env = _case("local", "other", local_source, None, tmp_path)
    before = {n: folder.read(n) for n in folder.names()}
    args = tiny_overrides(tiny_mds, run_dir, folder.url, **{"trainer.max_duration": "10ba", "trainer.autoresume": "false"})
    assert wait(launch(args, cwd=tmp_path, env=env_with_repo_on_path(**KEY), log="fresh"), 300) == 2
    out = (tmp_path / "fresh.launcher.log").read_text()
    assert "cannot resume from" in out and "trainer.start_over=true" in out and "-ba30-rank0.tar" in out
    assert {n: folder.read(n) for n in folder.names()} == before  # nothing overwritten
    run(args + ["trainer.start_over=true"], cwd=tmp_path, env=env_with_repo_on_path(**KEY), log="over")
    names = folder.names()
    assert not [n for n in names if "-ba20" in n or "-ba30" in n]  # the earlier run's files are gone
    assert sorted(losses(run_dir)) == list(range(1, 11))


# ----------------------------------------------------------------------------- issue: idempotent rerun
def test_rerunning_a_finished_run_is_a_no_op_and_extending_it_continues_exactly(clean_run, local_source, tiny_mds, tmp_path):
    """The same command again writes nothing; a longer max_duration continues from the newest
    complete step (its `latest` pointer deleted) exactly like the uninterrupted run."""
    folder, run_dir, _ = _case("local", "rerun", local_source, None, tmp_path)
    ckpt = Path(folder.url)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink()}
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    args = tiny_overrides(tiny_mds, run_dir, folder.url, **{"trainer.max_duration": f"{SOURCE_END}ba"})  # the source's command
    env = env_with_repo_on_path(**KEY)
    assert wait(launch(args, cwd=tmp_path, env=env, log="again"), 300) == 0, logs(tmp_path)
    out = (tmp_path / "again.launcher.log").read_text()
    assert f"run t is complete at {SOURCE_END}ba" in out and "nothing to train" in out
    assert "EMA weights:" in out and "-ba30.safetensors" in out  # the end-of-run summary
    now = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink()}
    assert now == files  # no checkpoint, manifest or export rewritten
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    for pointer in ckpt.glob("latest-rank*"):  # a hint only: the newest complete step is found without it
        pointer.unlink()
    run(tiny_overrides(tiny_mds, run_dir, folder.url, **{"trainer.max_duration": f"{TARGET}ba"}), cwd=tmp_path, env=env, log="extend")
    out = (tmp_path / "extend.launcher.log").read_text()
    assert "resuming from" in out and f"-ba{SOURCE_END}" in out.split("resuming from")[1].splitlines()[0]
    assert_matches_clean(clean_run, run_dir, at_step(ckpt, "ema/ep*-ba{step}.safetensors", TARGET), SOURCE_END, last=TARGET)


# ----------------------------------------------------------------------------- object storage that does not answer
class _Silent:
    """A TCP server that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return


def test_a_refused_endpoint_is_one_clear_line_within_a_minute(tiny_mds, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = env_with_repo_on_path(S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    start = time.time()
    proc = launch(tiny_overrides(tiny_mds, tmp_path / "run", "s3://bucket/runs/{run_name}"), cwd=tmp_path, env=env)
    assert wait(proc, 300) == 4
    took = time.time() - start
    out = (tmp_path / "run.launcher.log").read_text()
    assert took < 90 and endpoint in out and "trainer.save_folder" in out and "Traceback" not in out


@pytest.fixture(scope="module", autouse=True)
def silent_endpoint_conversion(tmp_path_factory):
    """The converter against an endpoint that accepts connections and never answers, started with
    the module: what it waits for is wall-clock time, not CPU, so it runs beside the launches of
    the cases above; the last test reads its outcome."""
    from dip_scale.data import demo_tree

    tmp = tmp_path_factory.mktemp("silent")
    silent = _Silent()
    demo_tree.make(str(tmp / "tree"), classes=2, train_per_class=2, val_per_class=1, val_layout="folders", oddities=False, seed=0)
    endpoint = f"http://127.0.0.1:{silent.port}"
    env = env_with_repo_on_path(S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    outcome = {"endpoint": endpoint, "start": time.time(), "stderr": tmp / "stderr.txt"}
    with open(outcome["stderr"], "w") as err:
        proc = subprocess.Popen([PYTHON, str(ROOT / "tools" / "convert_imagenet_mds.py"), "--src", str(tmp / "tree"),
                                 "--out", "s3://bucket/mds", "--resolution", "32", "--workers", "1"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)

    def watch():
        outcome["rc"] = proc.wait()
        outcome["took"] = time.time() - outcome["start"]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome["watcher"] = watcher
    yield outcome
    proc.kill()


def test_a_silent_endpoint_does_not_hang_the_converter(silent_endpoint_conversion):
    outcome = silent_endpoint_conversion
    outcome["watcher"].join(timeout=300)
    stderr = outcome["stderr"].read_text()
    assert outcome.get("rc") == 2 and outcome["took"] < 90, (outcome, stderr)
    assert outcome["endpoint"] in stderr and "Traceback" not in stderr
