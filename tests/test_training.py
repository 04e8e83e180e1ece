"""Training under the real launcher: 2 processes, gloo, DeepSpeed ZeRO 1/2/3, local and S3
checkpoints, kill -9 and resume, the two-node layout, EMA maths, S3 outages, NaN guard."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import env_with_repo_on_path, free_port
from training_helpers import LAST, assert_ema_follows_the_master_weights, assert_matches_clean, at_step, kill_when, launch, logs, losses, run, tiny_overrides, wait

pytestmark = pytest.mark.slow
def test_the_reference_run_learns_and_exports_its_ema(clean_run):
    """The uninterrupted ZeRO-2 run every other run is held against: it logs every step, its loss
    falls, and each checkpoint has its EMA export. (ZeRO-1 and ZeRO-3 reproduce it:
    tests/test_elastic.py.)"""
    loss = losses(clean_run["run"])
    assert sorted(loss) == list(range(1, LAST + 1))
    first, last = (sum(loss[s] for s in steps) / 8 for steps in (range(1, 9), range(LAST - 7, LAST + 1)))
    assert last < 0.95 * first, (first, last)
    assert [at_step(clean_run["ckpt"], "ema/ep*-ba{step}.safetensors", s) for s in range(10, LAST + 1, 10)]


def test_kill9_and_restart_resumes_exactly_local(clean_run, tiny_mds, tmp_path):
    args = tiny_overrides(tiny_mds, tmp_path / "run", str(tmp_path / "ckpt"))
    proc = launch(args, cwd=tmp_path)
    kill_when(proc, lambda: os.path.lexists(tmp_path / "ckpt" / "latest-rank1.tar") and max(losses(tmp_path / "run") or [0]) > 10)
    resumed_from = int(os.readlink(tmp_path / "ckpt" / "latest-rank0.tar").rsplit("-ba", 1)[1].split("-")[0])
    assert resumed_from < max(losses(tmp_path / "run")) < LAST  # killed mid-run, past its last checkpoint
    run(args, cwd=tmp_path, log="resume")
    assert_matches_clean(clean_run, tmp_path / "run", at_step(tmp_path / "ckpt", "ema/ep*-ba{step}.safetensors", LAST), resumed_from)


def _s3_latest_step(s3, prefix: str) -> int:
    obj = s3["client"].get_object(Bucket=s3["bucket"], Key=f"{prefix}/latest-rank0.tar.symlink")["Body"].read().decode()
    return int(obj.rsplit("-ba", 1)[1].split("-")[0])


def _s3_has(s3, key: str) -> bool:
    return "Contents" in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=key)


def _s3_ema(s3, prefix: str, step: int) -> bytes:
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=f"{prefix}/ema/")["Contents"]]
    (key,) = [k for k in keys if k.endswith(f"-ba{step}.safetensors")]
    return s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()


def test_kill9_and_restart_resumes_exactly_through_s3(clean_run, tiny_mds, tmp_path, s3):
    env = env_with_repo_on_path(**s3["env"])
    args = tiny_overrides(tiny_mds, tmp_path / "run", f"{s3['url']}/runs/{{run_name}}")
    proc = launch(args, cwd=tmp_path, env=env)
    kill_when(proc, lambda: _s3_has(s3, "runs/t/latest-rank0.tar.symlink"))
    resumed_from = _s3_latest_step(s3, "runs/t")
    assert resumed_from < LAST and max(losses(tmp_path / "run")) < LAST, "the kill came after the end of training"
    run(args, cwd=tmp_path, env=env, log="resume")
    assert_matches_clean(clean_run, tmp_path / "run", _s3_ema(s3, "runs/t", LAST), resumed_from)
    assert not (tmp_path / "s3:").exists()  # no stray ./s3:/bucket/... copy (Composer's autoresume makes one)


def test_two_nodes_with_separate_disks_resume_exactly(clean_run, tiny_mds, tmp_path, s3):
    """2 "nodes" x 1 process (the launcher's node-rank arguments), each with its own working
    folder: node 1 never sees rank 0's files except through S3 (Composer issue #2326)."""
    env = env_with_repo_on_path(**s3["env"])
    nodes = [tmp_path / "node0", tmp_path / "node1"]

    def start(log):
        port = free_port()
        return [launch(tiny_overrides(tiny_mds, Path("run"), f"{s3['url']}/multi/{{run_name}}"), cwd=n, env=env,
                       nproc=1, node=(i, 2), port=port, log=log) for i, n in enumerate(nodes)]

    procs = start("first")
    kill_when(procs[0], lambda: _s3_has(s3, "multi/t/latest-rank0.tar.symlink"))
    os.killpg(procs[1].pid, 9)
    procs[1].wait()
    resumed_from = _s3_latest_step(s3, "multi/t")
    assert resumed_from < LAST and max(losses(nodes[0] / "run")) < LAST, "the kill came after the end of training"
    procs = start("resume")
    for n, p in zip(nodes, procs):
        assert wait(p, 600) == 0, logs(n)
    assert_matches_clean(clean_run, nodes[0] / "run", _s3_ema(s3, "multi/t", LAST), resumed_from)


def test_ema_matches_a_reference_from_the_checkpointed_training_weights(tiny_mds, tmp_path):
    """Under ZeRO-3 (partitioned parameters), fp32: the EMA export of every step is the average of
    the checkpointed training weights."""
    decay, ckpt = 0.5, tmp_path / "ckpt"
    run(tiny_overrides(tiny_mds, tmp_path / "run", str(ckpt), **{
        "deepspeed.zero_optimization.stage": 3, "ema.decay": decay, "trainer.max_duration": "4ba", "trainer.save_interval": "1ba"}), cwd=tmp_path)
    assert_ema_follows_the_master_weights(ckpt, 4, decay, tmp_path)


def test_training_survives_s3_outage_during_checkpoint_upload(tiny_mds, tmp_path, s3):
    from training_helpers import FlakyProxy

    proxy = FlakyProxy(int(s3["server"]["endpoint"].rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    env = env_with_repo_on_path(**dict(s3["env"], S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint))
    proc = launch(tiny_overrides(tiny_mds, tmp_path / "run", f"{s3['url']}/flaky"), cwd=tmp_path, env=env)
    assert proxy.upload_seen.wait(300), logs(tmp_path)
    proxy.outage(4.0)  # S3 unreachable while the first checkpoint uploads
    assert wait(proc, 600) == 0, logs(tmp_path)
    assert proxy.dropped > 0  # the run really met refused connections and retried through them
    assert sorted(losses(tmp_path / "run")) == list(range(1, LAST + 1))
    step = _s3_latest_step(s3, "flaky")
    assert step == LAST
    for r in (0, 1):  # the pointer names a checkpoint whose every rank's tar is complete on S3
        keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix="flaky/")["Contents"]]
        (key,) = [k for k in keys if k.endswith(f"-ba{step}-rank{r}.tar")]
        body = s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as t:
            assert t.getmembers()
    assert _s3_ema(s3, "flaky", 10) and _s3_ema(s3, "flaky", LAST)


def test_nan_guard_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_mds, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = launch(tiny_overrides(tiny_mds, tmp_path / "run", str(ckpt), **{
        "optimizer.lr": "1e12", "trainer.save_interval": "1ba"}), cwd=tmp_path)
    assert wait(proc, 300) != 0
    err = (tmp_path / "run.launcher.log").read_text()  # local rank 0 writes through the launcher
    assert "training stopped: non-finite loss" in (tmp_path / "run-rank1.err").read_text()  # every rank stops
    assert "training stopped: non-finite loss at batch" in err and "Traceback" not in err.split("training stopped")[0][-500:]
    bad = int(err.split("non-finite loss at batch ")[1].split()[0])
    assert bad >= 2 and "the last good checkpoint is" in err
    assert os.readlink(ckpt / "latest-rank0.tar").endswith(f"-ba{bad - 1}-rank0.tar")
    assert not list(ckpt.glob(f"*-ba{bad}-rank*.tar")) and not list(ckpt.glob(f"ema/*-ba{bad}.safetensors"))
    assert all(json.loads(line)["step"] < bad for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
