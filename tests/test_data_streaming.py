"""The streaming loader: S3 round trip across 2 ranks, and exact mid-epoch resumption."""
from __future__ import annotations

import json
import subprocess

import pytest

from dip_scale.data import demo_tree
from conftest import PYTHON, ROOT, composer_launch, env_with_repo_on_path

READ = ROOT / "tests" / "scripts" / "read_epoch.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tree32(tmp_path_factory):
    """32 train images in 4 classes: divisible by the global batch, so an epoch has no padding."""
    root = tmp_path_factory.mktemp("tree32")
    demo_tree.make(str(root), classes=4, train_per_class=8, val_per_class=1, val_layout="folders", oddities=False, seed=3)
    return str(root)


def _convert(src, out, env):
    proc = subprocess.run(
        [PYTHON, str(ROOT / "tools" / "convert_imagenet_mds.py"), "--src", src, "--out", out, "--splits", "train",
         "--resolution", "32", "--workers", "2", "--chunk-size", "8", "--shard-size", "8kb"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def _launch(tmp_path, name, remote, env, *args):
    out = tmp_path / name
    out.mkdir()
    proc = composer_launch(READ, remote, out, *args, env=env, log_dir=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:] + "".join(p.read_text()[-3000:] for p in out.glob("rank*.err"))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


def test_s3_round_trip_each_sample_once_per_epoch_across_ranks(tree32, tmp_path, s3):
    env = env_with_repo_on_path(**s3["env"])
    remote = f"{s3['url']}/imagenet-mds"
    _convert(tree32, remote, env)
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"])["Contents"]]
    assert "imagenet-mds/train/index.json" in keys and "imagenet-mds/dataset.json" in keys
    assert sum(k.endswith(".mds") for k in keys) > 4  # several shards per chunk (8 kB shards)

    ranks, _ = _launch(tmp_path, "read", remote, env, "--batch", "2", "--epochs", "2")
    per_epoch = 32 // 4  # batches per rank per epoch
    for epoch in range(2):
        ids = [i for r in ranks for b in r["batches"][epoch * per_epoch : (epoch + 1) * per_epoch] for i in b]
        assert sorted(ids) == list(range(32)), f"epoch {epoch}: every sample exactly once across ranks"
    first, second = ([i for b in r["batches"][:per_epoch] for i in b] for r in ranks)
    assert not set(first) & set(second)  # the ranks split the epoch
    assert ranks[0]["shapes"] == [[[3, 32, 32], "torch.uint8"]]


def test_mid_epoch_resume_sees_exactly_the_remaining_samples(tree32, tmp_path):
    """The dataset state taken after 3 batches (as a checkpoint takes it, the epoch read on) and
    loaded by a new launch: each rank reads exactly the batches the first launch read after it."""
    remote = str(tmp_path / "mds")
    env = env_with_repo_on_path()
    _convert(tree32, remote, env)
    full, full_dir = _launch(tmp_path, "full", remote, env, "--batch", "2", "--state-after", "3")
    tail, _ = _launch(tmp_path, "tail", remote, env, "--batch", "2", "--resume", full_dir / "state.json")
    for r in range(2):
        assert len(full[r]["batches"]) == 32 // 4
        assert tail[r]["batches"] == full[r]["batches"][3:], f"rank {r}: the resumed run diverged"
