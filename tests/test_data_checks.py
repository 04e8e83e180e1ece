"""The data against the model before training (dataset_problems, the train.py entry), and damaged
shards named when read: in place, through the cache with data.validate_hash, and from S3."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dip_scale.data import demo_tree
from conftest import PYTHON, ROOT, env_with_repo_on_path
from dip_scale.config import DataConfig, ModelConfig
from test_data_convert import flip_bytes, run_convert


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    """32 images at 32x32 in 4 classes, about two images per shard."""
    root = tmp_path_factory.mktemp("sharded")
    demo_tree.make(str(root / "tree"), classes=4, train_per_class=8, val_per_class=1, val_layout="folders", oddities=False, seed=8)
    r = run_convert(root / "tree", root / "mds", "--splits", "train", "--resolution", 32, "--workers", 2, "--shard-size", "8kb")
    assert r.returncode == 0, r.stderr
    return str(root / "mds")


def _problems(remote, split="train", image_size=32, num_classes=4, **data):
    from dip_scale.data.streaming import dataset_problems

    return dataset_problems(DataConfig(remote=remote, split=split, **data),
                            ModelConfig(preset="tiny/16", image_size=image_size, num_classes=num_classes))


@pytest.mark.slow
def test_the_data_is_checked_against_the_model(sharded, tmp_path):
    assert _problems(sharded) == []
    [p] = _problems(sharded, image_size=64)
    assert p.startswith(f"model.image_size: 64, but {sharded} holds 32x32 images") and "--resolution 64" in p
    [p] = _problems(sharded, num_classes=10)
    assert p == f"model.num_classes: 10, but {sharded} holds 4 classes (its dataset.json)"
    [p] = _problems(str(tmp_path / "nope"))
    assert p.startswith(f"data.remote: no such folder: {tmp_path / 'nope'}") and "dip-convert --src" in p
    [p] = _problems(sharded, split="val")
    assert p == f"data.split: 'val' has no MDS index ({sharded}/val/index.json not found); the splits there: train"
    unhashed = tmp_path / "unhashed"
    shutil.copytree(sharded, unhashed)
    index = json.loads((unhashed / "train" / "index.json").read_text())
    for s in index["shards"]:
        s["raw_data"]["hashes"] = {}
    (unhashed / "train" / "index.json").write_text(json.dumps(index))
    assert _problems(str(unhashed)) == []
    [p] = _problems(str(unhashed), validate_hash=True)
    assert p.startswith(f"data.validate_hash: {len(index['shards'])} of {len(index['shards'])} shards") and "no xxh64 hash" in p


def test_missing_s3_data_is_one_line(s3):
    [p] = _problems(f"{s3['url']}/nothing-here")
    assert p.startswith(f"data.split: 'train' has no MDS index ({s3['url']}/nothing-here/train/index.json not found)")
    [p] = _problems("s3://no-such-bucket-dip/mds")
    assert p.startswith("data.remote: cannot read s3://no-such-bucket-dip/mds:") and "NoSuchBucket" in p and "\n" not in p


@pytest.mark.slow
def test_train_entry_refuses_mismatched_or_missing_data_before_anything_is_built(sharded, tmp_path):
    def launch(*overrides):
        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [PYTHON, str(ROOT / "dip_scale" / "train.py"), str(ROOT / "yamls" / "dip_tiny_cpu.yaml"), f"run_dir={run_dir}",
             "eval.backend=none", "trainer.save_folder=null", "trainer.max_duration=2ba", "model.num_classes=4",
             "logging.sample_classes=[0,1,2,3]", *overrides],
            capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and not run_dir.exists()  # before the run folder, model or loader
        return proc.stderr

    err = launch(f"data.remote={sharded}", "model.image_size=64")
    assert f"model.image_size: 64, but {sharded} holds 32x32 images" in err
    err = launch(f"data.remote={tmp_path / 'missing'}", "model.image_size=32")
    assert f"data.remote: no such folder: {tmp_path / 'missing'}" in err


# ---------------------------------------------------------------------- damaged shards when read
def _shards(remote: str) -> list[str]:
    return [s["raw_data"]["basename"] for s in json.loads(Path(remote, "train", "index.json").read_text())["shards"]]


def _read_all(remote: str, cache: Path, workers: int, **data) -> int:
    """One epoch through the training loader; the number of images read. Under this shuffle
    seed both workers need the damaged shard early: a worker that did not fetch it itself could
    wait forever for the failed fetch (seen in about a third of the runs before the fix)."""
    from dip_scale.data.streaming import build_train_dataloader

    cfg = DataConfig(remote=remote, split="train", batch_size=2, num_workers=workers, **data)
    loader = build_train_dataloader(cfg, device_batch_size=2, seed=5, cache_dir=str(cache))
    return sum(len(images) for images, _, _ in loader)


@pytest.fixture
def damaged(sharded, tmp_path) -> tuple[str, Path, bytes]:
    """A copy of the dataset with bytes flipped inside one shard: (remote, that shard, its bytes)."""
    remote = tmp_path / "mds"
    shutil.copytree(sharded, remote)
    shard = remote / "train" / _shards(str(remote))[3]
    shard.write_bytes(flip_bytes(shard.read_bytes()))
    return str(remote), shard, shard.read_bytes()


@pytest.mark.slow
def test_a_damaged_shard_read_in_place_is_named_and_kept(damaged, tmp_path):
    from dip_scale.data.streaming import ShardError

    remote, shard, data = damaged
    with pytest.raises(ShardError) as e:
        _read_all(remote, tmp_path / "cache", workers=1)
    assert f"{shard}: cannot read sample" in str(e.value) and "train/n9000000" in str(e.value) and "--validate" in str(e.value)
    assert shard.read_bytes() == data  # the data itself is never touched


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_validate_hash_checks_local_shards_through_the_cache(damaged, tmp_path, sharded):
    from dip_scale.data.streaming import ShardError

    remote, shard, data = damaged
    cache = tmp_path / "cache"
    with pytest.raises(ShardError) as e:
        _read_all(remote, cache, workers=2, validate_hash=True)
    assert f"ShardError: {shard}: ValueError: Checksum failure" in str(e.value)
    assert shard.read_bytes() == data and not (cache / shard.relative_to(Path(remote, "train"))).exists()
    assert _read_all(sharded, tmp_path / "cache2", workers=2, validate_hash=True) == 32  # intact data reads whole


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_validate_hash_on_s3_names_the_object_and_keeps_no_bad_copy(sharded, tmp_path, s3):
    from dip_scale.data.streaming import ShardError

    client, bucket = s3["client"], s3["bucket"]
    for p in Path(sharded).rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"mds/{p.relative_to(sharded)}")
    name = _shards(sharded)[3]
    good = Path(sharded, "train", name).read_bytes()
    client.put_object(Bucket=bucket, Key=f"mds/train/{name}", Body=flip_bytes(good))
    cache = tmp_path / "cache"
    with pytest.raises(ShardError) as e:
        _read_all(f"{s3['url']}/mds", cache, workers=2, validate_hash=True)
    assert f"{s3['url']}/mds/train/{name}: ValueError: Checksum failure" in str(e.value)
    assert not (cache / name).exists()  # the next run fetches it again instead of serving the bad copy
    client.put_object(Bucket=bucket, Key=f"mds/train/{name}", Body=good)
    assert _read_all(f"{s3['url']}/mds", cache, workers=2, validate_hash=True) == 32


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_shard_failing_its_check_ahead_of_the_reader_stops_the_epoch(damaged, tmp_path):
    """streaming's download thread fetches ahead; when its hash check fails there, streaming
    ended the epoch early without an error (and raised a nameless "Background thread failed"
    only in the next one)."""
    from dip_scale.data.streaming import ShardError, build_dataset

    remote, shard, _ = damaged
    ds = build_dataset(DataConfig(remote=remote, split="train", shuffle=False, validate_hash=True), device_batch_size=2, seed=0,
                       cache_dir=str(tmp_path / "cache"))
    seen = []
    with pytest.raises(ShardError, match=f"{shard}: ValueError: Checksum failure"):
        for image, _, _ in ds:
            seen.append(image)
    assert len(seen) < 32
