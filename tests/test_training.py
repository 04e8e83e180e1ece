"""Training under the real launcher: 2 processes, gloo, DeepSpeed ZeRO-2: the reference run, the
two-node layout killed (-9) and restarted on empty disks through S3, NaN guard. (A local kill -9,
damage, attack, S3 outages and reruns: test_resume.py; ZeRO-1/3 and world-size changes:
test_elastic.py; the EMA against DeepSpeed's fp32 masters and bf16: test_gpu_path.py.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import env_with_repo_on_path, free_port
from dip_scale import naming
from training_helpers import LAST, assert_matches_clean, at_step, kill_when, launch, logs, losses, metrics, tiny_overrides, wait

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


def _pointed_step(pointer: str) -> int:
    """The step of the tar Composer's `latest` pointer names (a path or an S3 key)."""
    step, _rank = naming.parse_tar(pointer.rsplit("/", 1)[-1])
    return step.batch


def _s3_ema(s3, prefix: str, step: int) -> bytes:
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=f"{prefix}/ema/")["Contents"]]
    (key,) = [k for k in keys if k.endswith(f"-ba{step}.safetensors")]
    return s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()


def _s3_keys(s3, prefix: str) -> list[str]:
    out = []
    for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def test_two_nodes_restarted_on_empty_disks_resume_exactly_and_continue_their_run_files(clean_run, tiny_mds, tmp_path, s3):
    """2 "nodes" x 1 process (the launcher's node-rank arguments), each with its own working
    folder: node 1 never sees rank 0's files except through S3 (Composer issue #2326). Killed
    after the first S3 checkpoint, restarted on new, empty folders (new pods) with the same S3
    save folder: training continues bit for bit, and metrics.jsonl, the sample grids and the
    uploaded logs continue from the run-file mirror (training/mirror.py), nothing lost or twice."""
    env = env_with_repo_on_path(**s3["env"])
    extra = {"logging.sample_interval": "5ba", "logging.run_upload_interval": 5,
             # and Composer's RemoteUploaderDownloader, with what TensorBoard and the FileLogger hand it
             "loggers.tensorboard": "{}", "loggers.file.log_traces": "false",
             "loggers.remote_uploader.bucket_uri": s3["url"], "loggers.remote_uploader.file_path_format_string": "logs/{remote_file_name}"}

    def start(nodes, log):
        port = free_port()
        return [launch(tiny_overrides(tiny_mds, Path("run"), f"{s3['url']}/multi/{{run_name}}", **extra), cwd=n, env=env,
                       nproc=1, node=(i, 2), port=port, log=log) for i, n in enumerate(nodes)]

    first = [tmp_path / "pod0", tmp_path / "pod1"]
    procs = start(first, "first")
    kill_when(procs[0], lambda: bool(_s3_keys(s3, "multi/t/latest-rank0.tar.symlink")))
    os.killpg(procs[1].pid, 9)
    procs[1].wait()
    latest = s3["client"].get_object(Bucket=s3["bucket"], Key="multi/t/latest-rank0.tar.symlink")["Body"].read().decode()
    resumed_from = _pointed_step(latest)
    before = {r["step"]: r for r in metrics(first[0] / "run")}
    assert resumed_from < LAST and max(before) < LAST, "the kill came after the end of training"
    grids_before = {p.name: p.read_bytes() for p in (first[0] / "run" / naming.SAMPLES_DIR).iterdir()}

    fresh = [tmp_path / "new-pod0", tmp_path / "new-pod1"]  # empty disks
    procs = start(fresh, "resume")
    for n, p in zip(fresh, procs):
        assert wait(p, 600) == 0, logs(n)

    assert_matches_clean(clean_run, fresh[0] / "run", _s3_ema(s3, "multi/t", LAST), resumed_from)
    rows = metrics(fresh[0] / "run")
    assert [r["step"] for r in rows] == list(range(1, LAST + 1)), "metrics.jsonl should read like one run"
    assert all(rows[s - 1] == before[s] for s in range(1, resumed_from + 1)), "lines up to the resume point are the first run's"
    grids = sorted((fresh[0] / "run" / naming.SAMPLES_DIR).iterdir(), key=lambda p: naming.parse_grid(p.name))
    assert [p.name for p in grids] == [f"ba{s}.png" for s in range(5, LAST + 1, 5)]
    assert all(grids_before[p.name] == p.read_bytes() for p in grids if naming.parse_grid(p.name) <= resumed_from)
    assert all(grids_before[name] == (fresh[0] / "run" / naming.SAMPLES_DIR / name).read_bytes() for name in grids_before
               if naming.parse_grid(name) > resumed_from), "a grid after the resume point differs from the first run's"

    # the mirror on S3 holds the same: one run's lines (merged parts), every grid once, the config
    from dip_scale.training.mirror import merge_parts

    keys = _s3_keys(s3, "multi/run/t/")
    get = lambda k: s3["client"].get_object(Bucket=s3["bucket"], Key=k)["Body"].read()  # noqa: E731
    parts = {int(k.rsplit("/", 1)[1].split(".")[0]): get(k) for k in keys if k.startswith("multi/run/t/metrics/")}
    assert merge_parts(parts) == rows
    assert sorted(k.rsplit("/", 1)[1] for k in keys if k.startswith("multi/run/t/samples/")) == sorted(p.name for p in grids)
    assert b"run_name: t" in get("multi/run/t/config.yaml")
    assert not (fresh[1] / "run" / "metrics.jsonl").exists()  # node 1 keeps no run files
    assert not [n for n in first + fresh if (n / "s3:").exists()]  # no stray ./s3:/bucket/... copy (Composer's autoresume makes one)

    uploaded = _s3_keys(s3, "logs/")
    assert {"logs/t/logs-rank0.txt", "logs/t/logs-rank1.txt"} <= set(uploaded), uploaded
    assert b"loss/train/total" in get("logs/t/logs-rank0.txt")
    assert any(k.startswith("logs/tensorboard_logs/t/events.out.tfevents") for k in uploaded), uploaded


def test_nan_guard_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_mds, tmp_path):
    ckpt = tmp_path / "ckpt"
    from dip_scale.train import EXIT_NONFINITE
    from test_deploy import fail_job_codes

    proc = launch(tiny_overrides(tiny_mds, tmp_path / "run", str(ckpt), **{
        "optimizer.lr": "1e12", "trainer.save_interval": "1ba"}), cwd=tmp_path)
    # the launcher's exit code is the one docker/k8s's podFailurePolicy fails the Job on (no retry)
    assert wait(proc, 300) == EXIT_NONFINITE and EXIT_NONFINITE in fail_job_codes()
    err = (tmp_path / "run.launcher.log").read_text()  # local rank 0 writes through the launcher
    assert "training stopped: non-finite loss" in (tmp_path / "run-rank1.err").read_text()  # every rank stops
    assert "training stopped: non-finite loss at batch" in err and "Traceback" not in err.split("training stopped")[0][-500:]
    bad = int(err.split("non-finite loss at batch ")[1].split()[0])
    assert bad >= 2 and "the last good checkpoint is" in err
    assert os.readlink(ckpt / "latest-rank0.tar").endswith(f"-ba{bad - 1}-rank0.tar")
    assert not list(ckpt.glob(f"*-ba{bad}-rank*.tar")) and not list(ckpt.glob(f"ema/*-ba{bad}.safetensors"))
    assert all(json.loads(line)["step"] < bad for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
