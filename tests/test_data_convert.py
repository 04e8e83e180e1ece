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

from dip_scale.data import demo_tree
from conftest import PYTHON, ROOT, env_with_repo_on_path
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_flat_val_with_devkit_ground_truth(tmp_path):
    root = tmp_path / "tree"
    demo_tree.make(str(root), classes=3, train_per_class=2, val_per_class=3, val_layout="flat-devkit", oddities=False, seed=1)
    out = tmp_path / "mds"
    r = run_convert(root, out, "--splits", "val", "--resolution", 32, "--workers", 1)
    assert r.returncode == 0, r.stderr
    # the generator reversed the devkit ids (id = classes - index): labels must undo that
    gt = [int(x) for x in (root / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    stems = sorted(p.stem for p in (root / "val").iterdir())
    truth = {f"val/{stem}.JPEG": 3 - i for stem, i in zip(stems, gt)}
    assert {s["key"]: s["label"] for s in read_split(str(out / "val"))} == truth


@pytest.mark.slow
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


@pytest.mark.slow
def test_killed_conversion_resumes_to_the_uninterrupted_result(tmp_path):
    root = tmp_path / "tree"
    demo_tree.make(str(root), classes=8, train_per_class=24, val_per_class=1, val_layout="folders", oddities=False, seed=2)
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


@pytest.mark.slow
def test_bad_arguments_fail_before_any_work(tmp_path, demo_tree):
    r = run_convert(demo_tree["root"], tmp_path / "x", "--encoding", "original", "--resolution", 256)
    assert r.returncode == 2 and "--encoding original" in r.stderr and "--resolution 0" in r.stderr
    r = run_convert(tmp_path / "nope", tmp_path / "x")
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = run_convert(demo_tree["root"], "gs://bucket/x")
    assert r.returncode == 2 and "neither a local folder nor s3://" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_limit_per_class_makes_balanced_subsets(demo_tree, tmp_path):
    out = tmp_path / "subset"
    r = run_convert(demo_tree["root"], out, "--splits", "val", "--resolution", 32, "--limit-per-class", 2, "--workers", 1)
    assert r.returncode == 0, r.stderr
    labels = sorted(s["label"] for s in read_split(str(out / "val")))
    assert labels == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.slow
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


# ---------------------------------------------------------------------- every file accounted for
def _tree_with_stray_files(root: Path) -> Path:
    """A small tree plus what the real world leaves in one: other formats Pillow reads, a backup
    copy, a sub-folder of a class folder, a loose image under train/ and a note."""
    demo_tree.make(str(root), classes=3, train_per_class=2, val_per_class=1, val_layout="folders", oddities=False, seed=5)
    c0, c1 = root / "train" / "n90000000", root / "train" / "n90000001"
    jpeg = c0 / "n90000000_0.JPEG"
    img = load_rgb(jpeg.read_bytes())
    img.save(c0 / "extra.webp", format="WEBP", lossless=True)
    img.save(c1 / "scan.tif", format="TIFF")
    (c1 / "more").mkdir()
    img.save(c1 / "more" / "nested.JPEG", format="JPEG")
    (c0 / "n90000000_0.JPG.bak").write_bytes(jpeg.read_bytes())
    img.save(root / "train" / "loose.JPEG", format="JPEG")
    (c0 / "notes.txt").write_text("downloaded 2012\n")
    return root


@pytest.mark.slow
def test_every_source_file_is_converted_or_reported_with_its_reason(tmp_path):
    root = _tree_with_stray_files(tmp_path / "tree")
    out = tmp_path / "mds"
    r = run_convert(root, out, "--splits", "train", "--resolution", 32, "--workers", 1)
    assert r.returncode == 0, r.stderr
    stored = {s["key"]: s for s in read_split(str(out / "train"))}
    # formats Pillow reads are converted, a class's sub-folder belongs to the class (as in ImageFolder)
    for key, label in (("train/n90000000/extra.webp", 0), ("train/n90000001/scan.tif", 1), ("train/n90000001/more/nested.JPEG", 1)):
        assert stored[key]["label"] == label
        assert np.array_equal(to_tensor_array(stored[key]["image"]), center_crop_arr(load_rgb((root / key).read_bytes()), 32)), key
    report = json.loads((out / "conversion_report.json").read_text())["splits"]["train"]
    assert report["not_converted"] == [
        {"path": "train/loose.JPEG", "reason": "outside the class folders"},
        {"path": "train/n90000000/n90000000_0.JPG.bak", "reason": "image content under a non-image file name", "format": "JPEG"},
        {"path": "train/n90000000/notes.txt", "reason": "not an image"},
    ]
    # the books balance: every file under train/ is either stored or listed
    files = {str(p.relative_to(root)) for p in (root / "train").rglob("*") if p.is_file()}
    assert files == set(stored) | {e["path"] for e in report["not_converted"]}
    assert report["files"] == len(files) == report["written"] + len(report["bad"]) + sum(report["not_converted_counts"].values())
    for text in ("1 image content under a non-image file name", "1 not an image", "1 outside the class folders"):
        assert text in r.stderr
    outside = json.loads((out / "conversion_report.json").read_text())["outside_splits"]
    assert {"path": "val/", "reason": "not under a converted split"} in outside
    assert {"path": "LOC_synset_mapping.txt", "reason": "not under a converted split"} in outside


@pytest.mark.slow
def test_limit_per_class_reports_the_files_it_leaves_out(demo_tree, tmp_path):
    out = tmp_path / "subset"
    r = run_convert(demo_tree["root"], out, "--splits", "val", "--resolution", 32, "--limit-per-class", 1, "--workers", 1)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "conversion_report.json").read_text())["splits"]["val"]
    assert report["written"] == 4 and report["not_converted_counts"] == {"beyond --limit-per-class": 8}
    assert report["files"] == demo_tree["val"]


@pytest.mark.slow
def test_an_empty_class_folder_is_an_error_unless_allowed(tmp_path):
    root = tmp_path / "tree"
    demo_tree.make(str(root), classes=3, train_per_class=2, val_per_class=1, val_layout="folders", oddities=False, seed=6)
    (root / "train" / "n90000007").mkdir()
    out = tmp_path / "mds"
    r = run_convert(root, out, "--splits", "train", "--resolution", 32, "--workers", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(root / "train" / "n90000007") in r.stderr and "--allow-empty-classes" in r.stderr
    assert not out.exists()  # refused before anything was written
    r = run_convert(root, out, "--splits", "train", "--resolution", 32, "--workers", 1, "--allow-empty-classes")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "dataset.json").read_text())
    assert [c["wnid"] for c in info["classes"]][-1] == "n90000007" and len(info["classes"]) == 4
    report = json.loads((out / "conversion_report.json").read_text())["splits"]["train"]
    assert report["empty_classes"] == ["train/n90000007"] and report["written"] == 6


# ---------------------------------------------------------------------- another writer's index
@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-tree")
    demo_tree.make(str(root), classes=3, train_per_class=4, val_per_class=1, val_layout="folders", oddities=False, seed=7)
    return root


def _listing(out: str, s3=None) -> dict[str, bytes]:
    """Every file (object) under `out` with its bytes."""
    if s3 is None:
        return {str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    prefix = out[len(f"s3://{s3['bucket']}/"):]
    objects = s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3["client"].get_object(Bucket=s3["bucket"], Key=o["Key"])["Body"].read() for o in objects}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_output_split_holding_another_writers_index_is_refused(small_tree, tmp_path, where, request):
    from streaming import MDSWriter

    s3 = request.getfixturevalue("s3") if where == "s3" else None
    out = f"{s3['url']}/mds" if s3 else str(tmp_path / "mds")
    with MDSWriter(out=f"{out}/train", columns={"x": "int"}) as w:  # someone else's dataset
        for i in range(3):
            w.write({"x": i})
    before = _listing(out, s3)
    r = run_convert(small_tree, out, "--splits", "train", "--resolution", 32, "--workers", 1,
                    env=env_with_repo_on_path(**s3["env"]) if s3 else None)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{out}/train/index.json already exists" in r.stderr and "new --out" in r.stderr
    assert _listing(out, s3) == before  # nothing written, nothing replaced


@pytest.mark.slow
def test_a_finished_conversion_reruns_to_the_same_index(small_tree, tmp_path):
    out = tmp_path / "mds"
    assert run_convert(small_tree, out, "--splits", "train", "--resolution", 32, "--workers", 1).returncode == 0
    index = (out / "train" / "index.json").read_bytes()
    again = run_convert(small_tree, out, "--splits", "train", "--resolution", 32, "--workers", 1)
    assert again.returncode == 0 and "resuming, 1/1 chunks" in again.stderr, again.stderr
    assert (out / "train" / "index.json").read_bytes() == index


# ---------------------------------------------------------------------- shard hashes
def flip_bytes(data: bytes) -> bytes:
    """16 bytes inverted inside the first PNG's pixel data (IDAT) of a shard."""
    at = data.index(b"IDAT") + 24
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_validate_checks_every_shard_hash_and_names_a_damaged_shard(small_tree, tmp_path, where, request):
    s3 = request.getfixturevalue("s3") if where == "s3" else None
    out = f"{s3['url']}/mds" if s3 else str(tmp_path / "mds")
    env = env_with_repo_on_path(**s3["env"]) if s3 else None
    args = ["--splits", "train", "--resolution", 32, "--workers", 2, "--chunk-size", 6, "--shard-size", "8kb"]
    assert run_convert(small_tree, out, *args, env=env).returncode == 0
    files = _listing(out, s3)
    index = json.loads(next(v for k, v in files.items() if k.endswith("train/index.json")))
    shards = [s["raw_data"] for s in index["shards"]]
    assert len(shards) > 2 and all(len(s["hashes"]["xxh64"]) == 16 for s in shards)

    name = next(k for k in files if k.endswith(shards[1]["basename"]))
    damaged = flip_bytes(files[name])
    if s3:
        s3["client"].put_object(Bucket=s3["bucket"], Key=name, Body=damaged)
    else:
        Path(out, name).write_bytes(damaged)
    shard_url = f"{out}/train/{shards[1]['basename']}"
    r = run_convert(small_tree, out, *args, "--validate", 4, env=env)
    assert r.returncode == 1, r.stderr
    assert f"damaged shard {shard_url}: xxh64 hash differs" in r.stderr and "delete its chunk-NNNNN folder" in r.stderr
    report = json.loads(_listing(out, s3)[next(k for k in files if k.endswith("conversion_report.json"))])
    assert report["status"] == "validation failed"
    assert [d["shard"] for d in report["validation"]["train"]["shards"]["damaged"]] == [shard_url]
    assert _listing(out, s3)[name] == damaged  # validation changes nothing

    # the repair the message describes rewrites the shard byte for byte
    chunk = shards[1]["basename"].split("/")[0]
    if s3:
        for key in [k for k in files if f"train/{chunk}/" in k or k.endswith("train/index.json")]:
            s3["client"].delete_object(Bucket=s3["bucket"], Key=key)
    else:
        import shutil

        shutil.rmtree(Path(out, "train", chunk))
        Path(out, "train", "index.json").unlink()
    r = run_convert(small_tree, out, *args, "--validate", 4, env=env)
    assert r.returncode == 0, r.stderr
    after = _listing(out, s3)
    assert {k: v for k, v in after.items() if "conversion_report" not in k} == {k: v for k, v in files.items() if "conversion_report" not in k}
