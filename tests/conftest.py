"""Shared fixtures: repository paths, a real S3-compatible HTTP server (moto) on 127.0.0.1,
the real `composer` launcher, and generated ImageNet-layout data."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the venv interpreter running pytest
BIN = Path(PYTHON).parent


def env_with_repo_on_path(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


TINY_MODEL = {"model.preset": "tiny/16", "model.image_size": 32, "model.num_classes": 4, "model.head.channels": "[8,16,32,64]"}


def tiny_config(**overrides):
    """The tests' one small experiment config (what tiny_overrides trains too): DiP tiny/16 at
    32x32, 4 classes, a quarter-width head; `overrides` are key.path -> value, e.g.
    tiny_config(**{"model.num_classes": 10})."""
    from dip_scale.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in {**TINY_MODEL, **overrides}.items()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(nproc: int = 2, port=None, log_dir=None, log: str = "rank", extra=()) -> list[str]:
    """The real `composer` launcher for nproc processes (gloo on CPU) on a free port; every rank's
    output goes to <log_dir>/<log>{rank}.out|.err when log_dir is given. The one place tests build it."""
    cmd = [str(BIN / "composer"), "-n", str(nproc), "--master_port", str(port or free_port()), *extra]
    if log_dir is not None:
        cmd += ["--stdout", f"{log_dir}/{log}{{rank}}.out", "--stderr", f"{log_dir}/{log}{{rank}}.err"]
    return cmd


def composer_launch(script, *args, nproc: int = 2, env=None, timeout: int = 600, log_dir=None, extra=()):
    """Run `composer -n nproc script args` to its end."""
    cmd = [*launcher_command(nproc, log_dir=log_dir, extra=extra), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or env_with_repo_on_path(), timeout=timeout)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server in its own process (so tests can pause it to simulate an outage)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield {"endpoint": endpoint, "proc": proc}
    proc.kill()
    proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket on the moto server, its environment set here and for subprocesses."""
    env = dict(S3_ENV, S3_ENDPOINT_URL=s3_server["endpoint"], AWS_ENDPOINT_URL=s3_server["endpoint"])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    bucket = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    bucket = "".join(c for c in bucket if c.isalnum() or c == "-")[:60]
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"])
    client.create_bucket(Bucket=bucket)
    from dip_scale.storage import s3_client

    s3_client.cache_clear()
    return {"bucket": bucket, "url": f"s3://{bucket}", "env": env, "client": client, "server": s3_server}


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> dict:
    """An ImageNet-layout tree with the real train set's oddities (CMYK, PNG named .JPEG,
    greyscale, truncated) and a flat val/ labelled by LOC_val_solution.csv."""
    from dip_scale.data import demo_tree

    out = tmp_path_factory.mktemp("imagenet")
    info = demo_tree.make(str(out), classes=4, train_per_class=12, val_per_class=3,
                                            val_layout="flat-csv", oddities=True, seed=0)
    return {"root": str(out), **info}


@pytest.fixture
def fake_dinov2_weights(tmp_path) -> str:
    """A tiny DINOv2 checkpoint in the official layout, so YAMLs with REPA enabled validate."""
    import torch

    from dip_scale.diffusion.repa import DINOv2

    vit = DINOv2(dim=64, depth=2, num_heads=1, patch=14, pos_grid=4, mlp_hidden=128)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(vit.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_mds(tmp_path_factory) -> str:
    """64 images in 4 classes at 32x32, converted with the real converter."""
    from dip_scale.data import demo_tree

    root = tmp_path_factory.mktemp("train-data")
    demo_tree.make(str(root / "tree"), classes=4, train_per_class=16, val_per_class=1,
                                     val_layout="folders", oddities=False, seed=4)
    proc = subprocess.run(
        [PYTHON, "-m", "dip_scale.cli.convert", "--src", str(root / "tree"), "--out", str(root / "mds"),
         "--splits", "train", "--resolution", "32", "--workers", "2"],
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return str(root / "mds")


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory) -> str:
    """A small TorchScript net with clean-fid's Inception interface, under the file name clean-fid loads."""
    from dip_scale.eval import standin_inception

    return standin_inception.write(str(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"))


@pytest.fixture(scope="session")
def clean_run(tiny_mds, tmp_path_factory) -> dict:
    """60 uninterrupted steps (2 ranks, ZeRO-2, checkpoints every 10): the reference every resumed
    run must reproduce bit for bit, wherever its checkpoints live and however many nodes it spans,
    and that the other ZeRO stages, the compiled model and a 1-process run must reproduce to
    reduction-order tolerance."""
    from training_helpers import LAST, at_step, run, tiny_overrides

    root = tmp_path_factory.mktemp("clean")
    # launched as a module (`composer -m dip_scale.train`): the resumed runs, launched by path, reproduce it
    run(tiny_overrides(tiny_mds, root / "run", str(root / "ckpt")), cwd=root, module=True)
    return {"run": root / "run", "ckpt": root / "ckpt", "ema": at_step(root / "ckpt", "ema/ep*-ba{step}.safetensors", LAST)}


def write_reference(path: str, inception: str, images, mode: str = "clean", **meta) -> str:
    """Reference statistics of `images` (uint8 N x H x W x 3) for every metric of the suite, as
    dip-fid-stats writes them (pool and spatial statistics, pool features for P/R)."""
    import torch

    from dip_scale.eval.features import SPATIAL_DIM, FeatureStats, InceptionFeatures, save_reference, sha256_of

    f = InceptionFeatures(inception, mode, torch.device("cpu"))(images)
    pool, spatial = FeatureStats(), FeatureStats(SPATIAL_DIM)
    pool.add(f["pool"])
    spatial.add(f["spatial"])
    save_reference(path, pool, spatial, pr_features=f["pool"], feature_mode=mode, inception_sha256=sha256_of(inception), **meta)
    return path


@pytest.fixture
def kube_api():
    """A local Kubernetes API speaking the endpoints the official client calls (tests/kube_server.py)."""
    from kube_server import serve

    server, state = serve("127.0.0.1")
    yield state
    server.shutdown()
    server.server_close()

