"""tools/convert_imagenet_mds.py on a generated ImageNet-layout tree with the real oddities."""
from __future__ import annotations

import csv
import filecmp
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, ROOT, env_with_repo_on_path, load_tool
from dip_scale.data.imagenet import center_crop_arr, load_rgb, to_tensor_array

CONVERT = ROOT / "tools" / "convert_imagenet_mds.py"


def run_convert(src, out, *args, env=None, timeout=300):
    return subprocess.run(
        [PYTHON, str(CONVERT), "--src", str(src), "--out", str(out), *map(str, args)],
        capture_output=True, text=True, env=env or env_with_repo_on_path(), timeout=timeout,
    )


def read_split(path: str, cache: str | None = None) -> list[dict]:
    """Every stored sample in stored order, through streaming's own reader."""
    from streaming import StreamingDataset

    remote, local = (path, cache) if path.startswith("s3://") else (None, path)
    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        del ds


def expected_val_labels(root: str) -> dict[str, int]:
    with open(os.path.join(root, "LOC_val_solution.csv")) as f:
        wnids = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    classes = sorted(os.listdir(os.path.join(root, "train")))
    return {f"val/{stem}.JPEG": classes.index(w) for stem, w in wnids.items()}


@pytest.fixture(scope="module")
def converted_png(demo_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("mds-png")
    first = run_convert(demo_tree["root"], out, "--resolution", 64, "--workers", 2, "--chunk-size", 10)
    first_report = json.loads(Path(out, "conversion_report.json").read_text())
    merged_after_first = Path(out, "train", "index.json").exists()
    second = run_convert(demo_tree["root"], out, "--resolution", 64, "--workers", 2, "--chunk-size", 10, "--skip-bad", "--validate", 20)
    return {"out": str(out), "first": first, "second": second, "first_report": first_report, "merged_after_first": merged_after_first}


def test_bad_file_is_reported_and_the_exit_code_follows_the_flag(converted_png, demo_tree):
    first, out = converted_png["first"], converted_png["out"]
    assert first.returncode == 1, first.stderr
    report = converted_png["first_report"]
    bad = report["splits"]["train"]["bad"]
    assert [b["path"] for b in bad] == ["train/n90000000/odd_truncated.JPEG"]
    assert "truncated" in bad[0]["reason"]
    assert report["status"].startswith("incomplete")
    assert not converted_png["merged_after_first"]  # an incomplete split is not readable as a dataset
    second = converted_png["second"]
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr  # the rerun reused the sealed chunks
    report = json.loads(Path(out, "conversion_report.json").read_text())
    assert report["status"] == "complete" and report["splits"]["train"]["bad"] == bad
    assert report["validation"]["train"]["mismatches"] == [] and report["validation"]["train"]["checked"] == 20


def test_counts_labels_and_class_metadata(converted_png, demo_tree):
    out = converted_png["out"]
    train = read_split(os.path.join(out, "train"))
    val = read_split(os.path.join(out, "val"))
    assert len(train) == demo_tree["train"] - 1  # all but the truncated file
    assert len(val) == demo_tree["val"]
    classes = sorted(os.listdir(os.path.join(demo_tree["root"], "train")))
    for s in train:
        assert s["label"] == classes.index(s["key"].split("/")[1])
    truth = expected_val_labels(demo_tree["root"])
    assert {s["key"]: s["label"] for s in val} == truth
    assert len({s["key"] for s in train}) == len(train)  # no duplicates
    labels = [s["label"] for s in train]
    assert labels != sorted(labels)  # shuffled: shards are not class-sorted
    info = json.loads(Path(out, "dataset.json").read_text())
    assert [c["wnid"] for c in info["classes"]] == classes
    assert info["classes"][1]["name"] == "chelsea" and info["splits"] == {"train": len(train), "val": len(val)}
    report = json.loads(Path(out, "conversion_report.json").read_text())
    assert sum(report["splits"]["train"]["per_class"].values()) == len(train)


def test_pixels_equal_the_adm_crop_of_the_source_exactly(converted_png, demo_tree):
    odd = demo_tree["oddities"]
    seen = set()
    for s in read_split(os.path.join(converted_png["out"], "train")):
        stored = to_tensor_array(s["image"])
        with open(os.path.join(demo_tree["root"], s["key"]), "rb") as f:
            src = load_rgb(f.read())
        assert stored.shape == (64, 64, 3)
        assert np.array_equal(stored, center_crop_arr(src, 64)), s["key"]
        if s["key"] in odd:
            seen.add(odd[s["key"]])
    assert seen == {"cmyk", "png", "greyscale"}  # every valid oddity made it, as RGB


def test_adm_crop_matches_guided_diffusion_semantics():
    # 600x400 -> halved once (box) to 300x200 (short side 200 < 2*128), bicubic to 192x128, centre crop
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))
    halved = img.resize((300, 200), resample=Image.BOX)
    ref = np.array(halved.resize((192, 128), resample=Image.BICUBIC))[:, 32:160]
    assert np.array_equal(center_crop_arr(img, 128), ref)


def test_jpeg_and_original_encodings(demo_tree, tmp_path):
    jpeg_out, orig_out = tmp_path / "jpeg", tmp_path / "orig"
    r = run_convert(demo_tree["root"], jpeg_out, "--splits", "val", "--resolution", 64, "--encoding", "jpeg", "--jpeg-quality", 95, "--workers", 1)
    assert r.returncode == 0, r.stderr
    for s in read_split(str(jpeg_out / "val")):
        with open(os.path.join(demo_tree["root"], s["key"]), "rb") as f:
            ref = center_crop_arr(load_rgb(f.read()), 64).astype(float)
        mse = np.mean((to_tensor_array(s["image"]).astype(float) - ref) ** 2)
        assert 10 * np.log10(255**2 / mse) >= 30  # stated JPEG tolerance: PSNR >= 30 dB
    r = run_convert(demo_tree["root"], orig_out, "--splits", "val", "--resolution", 0, "--encoding", "original", "--workers", 1)
    assert r.returncode == 0, r.stderr
    for s in read_split(str(orig_out / "val")):
        assert s["image"] == Path(demo_tree["root"], s["key"]).read_bytes()


def test_flat_val_with_devkit_ground_truth(tmp_path):
    root = tmp_path / "tree"
    load_tool("make_demo_data").make(str(root), classes=3, train_per_class=2, val_per_class=3, val_layout="flat-devkit", oddities=False, seed=1)
    out = tmp_path / "mds"
    r = run_convert(root, out, "--splits", "val", "--resolution", 32, "--workers", 1)
    assert r.returncode == 0, r.stderr
    # the generator reversed the devkit ids (id = classes - index): labels must undo that
    gt = [int(x) for x in (root / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    stems = sorted(p.stem for p in (root / "val").iterdir())
    truth = {f"val/{stem}.JPEG": 3 - i for stem, i in zip(stems, gt)}
    assert {s["key"]: s["label"] for s in read_split(str(out / "val"))} == truth


def test_same_seed_same_bytes_whatever_the_worker_count(demo_tree, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--splits", "val", "--resolution", 32, "--chunk-size", 5]
    assert run_convert(demo_tree["root"], a, *common, "--workers", 1).returncode == 0
    assert run_convert(demo_tree["root"], b, *common, "--workers", 2).returncode == 0
    assert run_convert(demo_tree["root"], c, *common, "--workers", 2, "--seed", 1).returncode == 0
    assert _same_tree(a, b)
    assert (a / "val" / "index.json").read_bytes() == (b / "val" / "index.json").read_bytes()
    keys = lambda p: [s["key"] for s in read_split(str(p / "val"))]  # noqa: E731
    assert keys(a) == keys(b) and keys(a) != keys(c) and sorted(keys(a)) == sorted(keys(c))


def _same_tree(a: Path, b: Path) -> bool:
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and f.name != "conversion_report.json")  # noqa: E731
    fa, fb = files(a), files(b)
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def test_killed_conversion_resumes_to_the_uninterrupted_result(tmp_path):
    root = tmp_path / "tree"
    load_tool("make_demo_data").make(str(root), classes=8, train_per_class=24, val_per_class=1, val_layout="folders", oddities=False, seed=2)
    args = ["--splits", "train", "--resolution", 64, "--chunk-size", 6, "--workers", 2]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run_convert(root, clean, *args).returncode == 0

    proc = subprocess.Popen(
        [PYTHON, str(CONVERT), "--src", str(root), "--out", str(killed), *map(str, args)],
        env=env_with_repo_on_path(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("train/chunk-*/done.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies at once, as on a node failure
    proc.wait()
    sealed = len(list(killed.glob("train/chunk-*/done.json")))
    assert 0 < sealed < 32, f"kill landed outside the run ({sealed} of 32 chunks sealed)"
    assert not (killed / "train" / "index.json").exists()

    rerun = run_convert(root, killed, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert _same_tree(clean, killed)


def test_bad_arguments_fail_before_any_work(tmp_path, demo_tree):
    r = run_convert(demo_tree["root"], tmp_path / "x", "--encoding", "original", "--resolution", 256)
    assert r.returncode == 2 and "--encoding original" in r.stderr and "--resolution 0" in r.stderr
    r = run_convert(tmp_path / "nope", tmp_path / "x")
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = run_convert(demo_tree["root"], "gs://bucket/x")
    assert r.returncode == 2 and "neither a local folder nor s3://" in r.stderr
    assert not (tmp_path / "x").exists()


def test_limit_per_class_makes_balanced_subsets(demo_tree, tmp_path):
    out = tmp_path / "subset"
    r = run_convert(demo_tree["root"], out, "--splits", "val", "--resolution", 32, "--limit-per-class", 2, "--workers", 1)
    assert r.returncode == 0, r.stderr
    labels = sorted(s["label"] for s in read_split(str(out / "val")))
    assert labels == [0, 0, 1, 1, 2, 2, 3, 3]


def test_loader_flips_deterministically_per_epoch_and_sample(converted_png):
    import torch

    from dip_scale.config import DataConfig
    from dip_scale.data.streaming import build_dataset

    def images(hflip, epoch):
        ds = build_dataset(DataConfig(remote=converted_png["out"], split="val", hflip=hflip), device_batch_size=1, seed=5, cache_dir="unused")
        ds.next_epoch = epoch + 1  # what StreamingDataset sets while iterating epoch `epoch`
        try:
            return [ds[i][0] for i in range(len(ds))]
        finally:
            del ds

    plain, e0, e0_again, e1 = images(False, 0), images(True, 0), images(True, 0), images(True, 1)
    assert all(p.dtype == torch.uint8 and p.shape == (3, 64, 64) for p in plain)
    flipped0 = [not torch.equal(a, b) for a, b in zip(plain, e0)]
    assert all(torch.equal(f, p.flip(-1)) for f, p, fl in zip(e0, plain, flipped0) if fl)
    assert 0 < sum(flipped0) < len(plain)  # about half
    assert all(torch.equal(a, b) for a, b in zip(e0, e0_again))  # same epoch: same flips (resumable)
    assert [not torch.equal(a, b) for a, b in zip(plain, e1)] != flipped0  # a new epoch draws again
