"""ImageNet tree -> MDS shards: parallel, resumable, deterministic (dip-convert).

The sample list of a split is sorted, shuffled with the seed, and cut into fixed chunks; each
chunk becomes one MDS partition `<out>/<split>/chunk-NNNNN/` written by one worker process
(uploaded shard by shard when `--out` is s3://) and sealed by a `done.json` marker written
after everything else. A rerun skips sealed chunks and rewrites unsealed ones, so a crash costs
at most the chunks in flight; the output depends on the input, settings and seed only, not on
the number of workers or on interruptions. The split's `index.json` (streaming's merge of the
chunk indices, in chunk order) is written only once every chunk is sealed and the counts add up;
one already there must be exactly that merge (another writer's index is refused, not served).

Every file under a split is accounted for: converted, undecodable (`bad`), or not converted
with a reason (`NOT_IMAGE` ... below). A file is converted when its name ends in a suffix of a
format Pillow opens; its content decides the decoder (a PNG named .JPEG is fine). Each shard's
xxh64 hash goes into index.json, for `--validate` and the loader's `data.validate_hash`.
"""
from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image

from dip_scale import storage
from dip_scale.data.imagenet import (
    COLUMNS,
    DATASET_FILE,
    INDEX_FILE,
    REPORT_FILE,
    SHARD_HASH,
    DatasetInfo,
    class_index,
    encode_image,
    load_rgb,
    preprocess,
)


class ConvertError(RuntimeError):
    """A problem with the input or the output location, worded for the user."""


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes written (workers and --skip-bad do not)."""

    resolution: int = 256
    encoding: str = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 1
    seed: int = 0
    chunk_size: int = 10_000
    shard_size: str = "64mb"
    limit_per_class: Optional[int] = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sample:
    path: str  # absolute source path
    key: str  # path relative to --src, stored with the sample
    label: int


# ------------------------------------------------------------------------------------ scanning
# Why a file under --src is not converted (the report lists each file with one of these).
NOT_IMAGE = "not an image"
IMAGE_UNDER_OTHER_NAME = "image content under a non-image file name"
NO_CLASS = "outside the class folders"
OVER_LIMIT = "beyond --limit-per-class"
NOT_A_SPLIT = "not under a converted split"


@lru_cache(maxsize=None)
def image_suffixes() -> frozenset[str]:
    """File name endings of every format this Pillow can open (.jpeg, .png, .webp, .tif, ...)."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_suffixes()


def _not_converted(path: str, key: str) -> dict:
    """A file without an image name, with what its content is: a backup such as x.JPG.bak is
    not made a (duplicate) sample, but the report says it holds an image."""
    try:
        with Image.open(path) as im:
            return {"path": key, "reason": IMAGE_UNDER_OTHER_NAME, "format": im.format}
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image
        return {"path": key, "reason": NOT_IMAGE}


def _files_under(folder: str, key: str):
    """(path, key) of every file below `folder`, sub-folders included (as torchvision's
    ImageFolder and ADM's loader read a class folder), in sorted order."""
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames.sort()
        for n in sorted(files):
            path = os.path.join(dirpath, n)
            yield path, f"{key}/{os.path.relpath(path, folder)}"


def skipped_counts(skipped: list[dict]) -> dict[str, int]:
    """Files not converted, by reason (an entry may stand for several files)."""
    counts = Counter()
    for s in skipped:
        counts[s["reason"]] += s.get("files", 1)
    return dict(sorted(counts.items()))


@dataclass
class Scan:
    samples: list[Sample]  # the images to convert, sorted by key
    skipped: list[dict]  # every other file of the split: {"path", "reason", ...}
    empty: list[str]  # class folders without a single image


def find_wnids(src: str) -> list[str]:
    """Class folders of train/ (or val/ in folder layout): the class set of the dataset."""
    for split in ("train", "val"):
        d = os.path.join(src, split)
        if os.path.isdir(d):
            wnids = sorted(e.name for e in os.scandir(d) if e.is_dir())
            if wnids:
                return wnids
    raise ConvertError(f"--src {src}: no class folders found under train/ or val/ (expected train/<wnid>/*.JPEG)")


def _first_existing(src: str, names: tuple[str, ...]) -> Optional[str]:
    for base in (src, os.path.join(src, "ILSVRC2012_devkit_t12", "data"), os.path.dirname(os.path.abspath(src))):
        for n in names:
            p = os.path.join(base, n)
            if os.path.isfile(p):
                return p
    return None


def read_class_names(src: str, synsets: Optional[str]) -> dict[str, str]:
    """wnid -> human-readable name from LOC_synset_mapping.txt / synset_words.txt ("n01440764
    tench, Tinca tinca") or the devkit's meta.mat; {} when none is found."""
    path = synsets or _first_existing(src, ("LOC_synset_mapping.txt", "synset_words.txt", "meta.mat"))
    if path is None:
        return {}
    if path.endswith(".mat"):
        return {wnid: words for _, wnid, words in _devkit_synsets(path)}
    names = {}
    with open(path) as f:
        for line in f:
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name.strip()
    return names


def _devkit_synsets(meta_mat: str) -> list[tuple[int, str, str]]:
    """(ILSVRC2012_ID, wnid, words) of the 1000 leaf classes in the devkit's meta.mat."""
    from scipy.io import loadmat

    rows = loadmat(meta_mat, squeeze_me=True)["synsets"]
    return [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"])) for r in rows if int(r["num_children"]) == 0]


def read_val_labels(src: str, val_labels: Optional[str], synsets: Optional[str]) -> dict[str, str]:
    """Flat val/: file stem -> wnid, from LOC_val_solution.csv or the devkit's
    ILSVRC2012_validation_ground_truth.txt (1-based class ids in sorted file order) plus its
    id -> wnid mapping (meta.mat, or a text file of "id wnid" lines)."""
    path = val_labels or _first_existing(src, ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt"))
    if path is None:
        raise ConvertError(
            f"--src {src}: val/ holds images but no class folders, and no labels were found; "
            "give --val-labels LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt"
        )
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    mapping = synsets or _first_existing(src, ("meta.mat",))
    if mapping is None:
        raise ConvertError(f"{path} holds class ids; the id -> wnid mapping (devkit meta.mat) is needed: give --synsets")
    if mapping.endswith(".mat"):
        id_to_wnid = {i: w for i, w, _ in _devkit_synsets(mapping)}
    else:
        with open(mapping) as f:
            id_to_wnid = {int(a): b for a, b in (line.split()[:2] for line in f if line.strip())}
    stems = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(src, "val")) if _is_image(n))
    with open(path) as f:
        ids = [int(line) for line in f if line.strip()]
    if len(ids) != len(stems):
        raise ConvertError(f"{path} has {len(ids)} labels for {len(stems)} images in {os.path.join(src, 'val')}")
    return {stem: id_to_wnid[i] for stem, i in zip(stems, ids)}


def scan_split(src: str, split: str, classes: dict[str, int], limit_per_class: Optional[int], flat_labels: Optional[dict[str, str]] = None) -> Scan:
    """Every file of a split: the images with their labels (the first N per class with a
    limit) and, with the reason, every file that is not converted."""
    root = os.path.join(src, split)
    if not os.path.isdir(root):
        raise ConvertError(f"--src {src}: no {split}/ folder")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    per_class: dict[int, list[Sample]] = {}
    skipped, empty = [], []
    if any(e.is_dir() for e in entries):  # <split>/<wnid>/*.JPEG
        for e in entries:
            if not e.is_dir():
                skipped.append({"path": f"{split}/{e.name}", "reason": NO_CLASS})
                continue
            if e.name not in classes:
                raise ConvertError(f"{e.path}: class folder {e.name!r} is not among the {len(classes)} train classes")
            images = per_class.setdefault(classes[e.name], [])
            for path, key in _files_under(e.path, f"{split}/{e.name}"):
                if _is_image(path):
                    images.append(Sample(path, key, classes[e.name]))
                else:
                    skipped.append(_not_converted(path, key))
            if not images:
                empty.append(e.path)
    else:  # flat, labels from a ground-truth file
        labels = flat_labels or {}
        for e in entries:
            if not _is_image(e.name):
                skipped.append(_not_converted(e.path, f"{split}/{e.name}"))
                continue
            stem = os.path.splitext(e.name)[0]
            if stem not in labels:
                raise ConvertError(f"{e.path} has no label in the ground-truth file")
            wnid = labels[stem]
            if wnid not in classes:
                raise ConvertError(f"{e.path}: label {wnid!r} is not a known class")
            per_class.setdefault(classes[wnid], []).append(Sample(e.path, f"{split}/{e.name}", classes[wnid]))
    wnids = sorted(classes, key=classes.get)
    samples = []
    for label in sorted(per_class):
        images = sorted(per_class[label], key=lambda s: s.key)
        samples += images[:limit_per_class]
        if limit_per_class is not None and len(images) > limit_per_class:  # the files after the first N keys
            skipped.append({"path": os.path.dirname(images[0].key), "class": wnids[label], "reason": OVER_LIMIT,
                            "files": len(images) - limit_per_class})
    return Scan(sorted(samples, key=lambda s: s.key), sorted(skipped, key=lambda s: s["path"]), empty)


def shuffled(samples: list[Sample], seed: int, split: str) -> list[Sample]:
    """Deterministic shuffle (seed and split name) so shards are not class-sorted."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return [samples[i] for i in rng.permutation(len(samples))]


# ------------------------------------------------------------------------------------ workers
_progress = None  # shared image counter, set in each worker by _init_worker


def _init_worker(counter) -> None:
    global _progress
    _progress = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    if sys.platform.startswith("linux"):  # die with the parent: no orphan may write after a crash
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WriterPool:
    """The spawned processes that write chunks, one pool for the whole conversion (each start
    imports streaming and torch: seconds), started only when a chunk is pending. Leaving the
    block terminates the workers, also on an error."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None
        self._counter = None

    def submit(self, fn, args):
        if self._pool is None:
            ctx = mp.get_context("spawn")
            self._counter = ctx.Value("q", 0)
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self._counter,))
        return self._pool.apply_async(fn, args)

    def images_done(self) -> int:
        """Images the workers have converted so far (for the progress bar)."""
        return self._counter.value if self._counter is not None else 0

    def __enter__(self) -> "WriterPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


def chunk_dir(out: str, split: str, chunk: int) -> str:
    return storage.join(out, split, f"chunk-{chunk:05d}")


def _keys_digest(samples: list[Sample]) -> str:
    return hashlib.sha256("\n".join(f"{s.key}\t{s.label}" for s in samples).encode()).hexdigest()[:16]


def encode_sample(sample: Sample, settings: Settings) -> bytes:
    """Source file -> stored bytes (raises on undecodable input)."""
    with open(sample.path, "rb") as f:
        raw = f.read()
    img = load_rgb(raw)  # decodes fully: truncated/corrupt files fail here
    if settings.encoding == "original":
        return raw
    return encode_image(preprocess(img, settings.resolution), settings.encoding, settings.jpeg_quality, settings.png_compress_level)


def convert_chunk(out: str, split: str, chunk: int, samples: list[Sample], settings: Settings) -> dict:
    """Write one chunk as an MDS partition and seal it with done.json; returns the marker."""
    from streaming import MDSWriter

    dest = chunk_dir(out, split, chunk)
    storage.remove_tree(dest)  # leftovers of an interrupted run
    bad, labels = [], Counter()
    with MDSWriter(out=dest, columns=COLUMNS, compression=None, size_limit=settings.shard_size, hashes=[SHARD_HASH],
                   exist_ok=True, retry=5) as writer:
        for s in samples:
            try:
                data = encode_sample(s, settings)
            except Exception as e:  # noqa: BLE001 - any decode failure is reported per file
                bad.append({"path": s.key, "reason": f"{type(e).__name__}: {e}"})
            else:
                writer.write({"image": data, "label": s.label, "key": s.key})
                labels[s.label] += 1
            if _progress is not None:
                with _progress.get_lock():
                    _progress.value += 1
    marker = {
        "chunk": chunk,
        "samples": sum(labels.values()),
        "bad": bad,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "fingerprint": settings.fingerprint(),
        "keys": _keys_digest(samples),
    }
    storage.write_bytes(storage.join(dest, "done.json"), json.dumps(marker).encode())
    return marker


# ------------------------------------------------------------------------------------ driver
@dataclass
class SplitResult:
    input: int
    written: int
    bad: list
    per_class: dict
    chunks: int
    merged: bool


def _read_marker(out: str, split: str, chunk: int) -> Optional[dict]:
    data = storage.read_bytes(storage.join(chunk_dir(out, split, chunk), "done.json"))
    return json.loads(data) if data else None


def sealed_chunks(out: str, split: str, chunks: list[list[Sample]], settings: Settings) -> dict[int, dict]:
    """The markers of the chunks a previous run completed; a chunk written with other settings
    or from other input files is an error (nothing of it is reused or rewritten)."""
    markers = {}
    for i, chunk in enumerate(chunks):
        m = _read_marker(out, split, i)
        if m is None:
            continue
        if m["fingerprint"] != settings.fingerprint():
            raise ConvertError(
                f"{chunk_dir(out, split, i)} was written with different settings (resolution, encoding, seed, "
                "chunk/shard size or limit); rerun with the original settings or use a new --out"
            )
        if m["keys"] != _keys_digest(chunk):
            raise ConvertError(f"{chunk_dir(out, split, i)}: the input files changed since it was written; use a new --out")
        markers[i] = m
    return markers


def merged_index(out: str, split: str, chunks: int) -> bytes:
    """streaming's merge of the chunk indices, in chunk order (computed in a temporary folder:
    the caller decides whether it may be written)."""
    import tempfile

    from streaming.base.util import merge_index

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # streaming logs its temp folders as root warnings
    try:
        with tempfile.TemporaryDirectory() as tmp:
            merge_index([storage.join(chunk_dir(out, split, i), INDEX_FILE) for i in range(chunks)], tmp)
            with open(os.path.join(tmp, INDEX_FILE), "rb") as f:
                return f.read()
    finally:
        root_logger.setLevel(level)


def check_split_index(out: str, split: str, chunks: int, markers: dict[int, dict]) -> None:
    """An index.json already in the output split must be the one this conversion writes (its
    chunks all sealed, the merge identical): streaming serves whatever that file lists, so
    another writer's index would silently stand in for this dataset."""
    index = storage.join(out, split, INDEX_FILE)
    existing = storage.read_bytes(index)
    if existing is None or (len(markers) == chunks and existing == merged_index(out, split, chunks)):
        return
    raise ConvertError(
        f"{index} already exists and is not the index of this conversion (another writer's dataset, or one made from "
        f"other input or settings); it was kept and nothing was written. Use a new --out, or delete "
        f"{storage.join(out, split)} if the data there is not needed"
    )


def convert_split(out: str, split: str, chunks: list[list[Sample]], markers: dict[int, dict], settings: Settings,
                  writers: WriterPool, skip_bad: bool) -> SplitResult:
    """Write the chunks not sealed yet, then the split's index once every chunk is sealed and
    the counts add up (with bad files only under --skip-bad)."""
    from tqdm import tqdm

    pending = [i for i in range(len(chunks)) if i not in markers]
    if markers:
        print(f"{split}: resuming, {len(markers)}/{len(chunks)} chunks already complete", file=sys.stderr)
    if pending:
        total, before = sum(len(chunks[i]) for i in pending), writers.images_done()
        jobs = {i: writers.submit(convert_chunk, (out, split, i, chunks[i], settings)) for i in pending}
        import streaming.base.util  # noqa: F401  (merged_index's import, seconds: done while the workers start)
        with tqdm(total=total, desc=f"{split}", unit="img", dynamic_ncols=True, smoothing=0.05) as bar:
            while jobs:
                next(iter(jobs.values())).wait(0.5)  # the oldest chunk, or a refresh of the bar
                bar.update(writers.images_done() - before - bar.n)
                for i in [i for i, j in jobs.items() if j.ready()]:
                    markers[i] = jobs.pop(i).get()  # re-raises a worker's exception here
            bar.update(writers.images_done() - before - bar.n)

    ordered = [markers[i] for i in range(len(chunks))]
    bad = [b for m in ordered for b in m["bad"]]
    written = sum(m["samples"] for m in ordered)
    inputs = sum(len(c) for c in chunks)
    if written + len(bad) != inputs:  # nothing valid is silently dropped
        raise ConvertError(f"{split}: {written} written + {len(bad)} bad != {inputs} input images")
    per_class = Counter()
    for m in ordered:
        per_class.update({int(k): v for k, v in m["labels"].items()})
    merged = not bad or skip_bad
    index = storage.join(out, split, INDEX_FILE)
    if merged and not storage.exists(index):  # one already there was checked by check_split_index
        storage.write_bytes(index, merged_index(out, split, len(chunks)))
    return SplitResult(inputs, written, bad, dict(sorted(per_class.items())), len(chunks), merged)


def check_shards(out: str, split: str, workers: int) -> dict:
    """Read every shard of the split and compare its size and xxh64 hash with index.json (the
    whole dataset is read once: a flipped byte anywhere is found)."""
    from concurrent.futures import ThreadPoolExecutor

    from streaming.base.hashing import get_hash
    from tqdm import tqdm

    shards = [s["raw_data"] for s in json.loads(storage.read_bytes(storage.join(out, split, INDEX_FILE)))["shards"]]

    def problem(info: dict) -> Optional[str]:
        data = storage.read_bytes(storage.join(out, split, info["basename"]))
        if data is None:
            return "missing"
        if len(data) != info["bytes"]:
            return f"{len(data)} bytes, index.json says {info['bytes']}"
        if SHARD_HASH not in info.get("hashes", {}):
            return f"index.json holds no {SHARD_HASH} hash for it (converted before hashes were written)"
        if get_hash(SHARD_HASH, data) != info["hashes"][SHARD_HASH]:
            return f"{SHARD_HASH} hash differs from index.json: the file is damaged"
        return None

    damaged = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=sum(s["bytes"] for s in shards), desc=f"{split}: shard hashes",
                                                     unit="B", unit_scale=True, dynamic_ncols=True) as bar:
        for info, why in zip(shards, pool.map(problem, shards)):
            bar.update(info["bytes"])
            if why:
                damaged.append({"shard": storage.join(out, split, info["basename"]), "problem": why})
    return {"checked": len(shards), "damaged": damaged}


def validate_split(src: str, out: str, split: str, settings: Settings, n: int, seed: int) -> dict:
    """Decode n random stored samples and compare with the source pushed through the same
    preprocessing: exact for png/original, PSNR >= 30 dB for jpeg."""
    import tempfile

    from streaming import StreamingDataset

    from dip_scale.data.imagenet import to_tensor_array

    with tempfile.TemporaryDirectory() as cache:
        remote, local = (storage.join(out, split), cache) if storage.is_s3(out) else (None, storage.join(out, split))
        ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
        idx = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
        worst, mismatches = float("inf"), []
        for i in idx:
            try:
                sample = ds[int(i)]
                stored = to_tensor_array(sample["image"]).astype(np.float64)
            except Exception as e:  # noqa: BLE001 - a damaged shard; check_shards names it
                mismatches.append(f"sample {i}: {type(e).__name__}: {e}")
                continue
            with open(os.path.join(src, sample["key"]), "rb") as f:
                source = np.asarray(preprocess(load_rgb(f.read()), settings.resolution)).astype(np.float64)
            mse = float(np.mean((stored - source) ** 2)) if stored.shape == source.shape else float("inf")
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
            worst = min(worst, psnr)
            if (settings.encoding == "jpeg" and psnr < 30) or (settings.encoding != "jpeg" and mse != 0):
                mismatches.append(sample["key"])
    return {"checked": int(len(idx)), "mismatches": mismatches, "worst_psnr_db": None if worst == float("inf") else round(worst, 2)}


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def _split_report(scan: Scan, r: SplitResult, wnids: list[str], src: str) -> dict:
    counts = skipped_counts(scan.skipped)
    return {
        "files": r.input + sum(counts.values()),  # = written + bad + not converted
        "input": r.input,
        "written": r.written,
        "bad": r.bad,
        "not_converted_counts": counts,
        "not_converted": scan.skipped,
        "empty_classes": [os.path.relpath(p, src) for p in scan.empty],
        "chunks": r.chunks,
        "per_class": {wnids[k]: v for k, v in r.per_class.items()},
    }


def _summary_line(split: str, entry: dict) -> str:
    """What became of every file of the split, in one line."""
    line = f"{split}: {entry['files']} files, {entry['written']} converted"
    if entry["bad"]:
        line += f", {len(entry['bad'])} undecodable"
    counts = entry["not_converted_counts"]
    if counts:
        line += f", {sum(counts.values())} not converted ({_counts_text(counts)})"
    return line


def outside_splits(src: str, splits: list[str]) -> list[dict]:
    """The entries of --src that no converted split covers (metadata files, other folders)."""
    return [{"path": e.name + ("/" if e.is_dir() else ""), "reason": NOT_A_SPLIT}
            for e in sorted(os.scandir(src), key=lambda e: e.name) if e.name not in splits]


def convert(
    src: str,
    out: str,
    splits: list[str],
    settings: Settings,
    workers: int,
    skip_bad: bool,
    validate: int = 0,
    synsets: Optional[str] = None,
    val_labels: Optional[str] = None,
    allow_empty_classes: bool = False,
) -> int:
    """Convert the splits; returns the process exit code (0 ok, 1 bad files without --skip-bad
    or failed validation). Every file under --src is either converted or listed in the report
    with the reason."""
    started = time.time()
    if storage.is_s3(out):  # first: an unreachable bucket fails within a minute, not after the scan
        storage.check_reachable(out, "--out")
    wnids = find_wnids(src)
    classes = class_index(wnids)
    names = read_class_names(src, synsets)
    scans: dict[str, Scan] = {}
    for split in splits:  # scan everything first: input errors surface before any writing
        split_dir = os.path.join(src, split)
        flat = os.path.isdir(split_dir) and not any(e.is_dir() for e in os.scandir(split_dir))
        labels = read_val_labels(src, val_labels, synsets) if flat else None
        scans[split] = scan_split(src, split, classes, settings.limit_per_class, labels)
        if not scans[split].samples:
            raise ConvertError(f"--src {src}: {split}/ holds no images (file names Pillow reads: .jpeg, .png, .webp, .tif, ...)")
        skipped = skipped_counts(scans[split].skipped)
        if skipped:
            print(f"{split}: {sum(skipped.values())} files not converted ({_counts_text(skipped)}); listed in {REPORT_FILE}", file=sys.stderr)
    empty = [p for scan in scans.values() for p in scan.empty]
    if empty and not allow_empty_classes:
        raise ConvertError(f"class folders without images: {', '.join(empty)}; add their images, remove the folders, or "
                           "pass --allow-empty-classes to keep these classes (their ids stay reserved) with 0 images")
    chunks = {s: _chunks(shuffled(scans[s].samples, settings.seed, s), settings.chunk_size) for s in splits}
    markers = {s: sealed_chunks(out, s, chunks[s], settings) for s in splits}
    for s in splits:  # before any writing: a foreign index stops the run with everything as it was
        check_split_index(out, s, len(chunks[s]), markers[s])
    storage.check_writable(out)

    pending = sum(len(chunks[s]) - len(markers[s]) for s in splits)
    with WriterPool(max(1, min(workers, pending))) as writers:
        results = {s: convert_split(out, s, chunks[s], markers[s], settings, writers, skip_bad) for s in splits}
    complete = all(r.merged for r in results.values())
    report = {
        "status": "complete" if complete else "incomplete: undecodable files (rerun with --skip-bad to accept)",
        "src": os.path.abspath(src),
        "out": out,
        "settings": asdict(settings),
        "workers": workers,
        "skip_bad": skip_bad,
        "allow_empty_classes": allow_empty_classes,
        "seconds": round(time.time() - started, 1),
        "splits": {s: _split_report(scans[s], r, wnids, src) for s, r in results.items()},
        "outside_splits": outside_splits(src, splits),
    }
    for s, entry in report["splits"].items():
        print(_summary_line(s, entry), file=sys.stderr)
    code = 0 if complete else 1
    if complete:
        info = DatasetInfo(
            classes=[{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)],
            resolution=settings.resolution,
            encoding=settings.encoding,
            jpeg_quality=settings.jpeg_quality,
            png_compress_level=settings.png_compress_level,
            seed=settings.seed,
            splits={s: r.written for s, r in results.items()},
        )
        storage.write_bytes(storage.join(out, DATASET_FILE), info.to_json().encode())
        if validate:
            report["validation"] = {s: {"shards": check_shards(out, s, workers), **validate_split(src, out, s, settings, validate, settings.seed)}
                                    for s in splits}
            damaged = [d for v in report["validation"].values() for d in v["shards"]["damaged"]]
            for d in damaged:
                print(f"damaged shard {d['shard']}: {d['problem']}", file=sys.stderr)
            if damaged:
                print("to rewrite a damaged shard, delete its chunk-NNNNN folder and the split's index.json, then rerun "
                      "the same command (the rewrite is byte-identical)", file=sys.stderr)
            if damaged or any(v["mismatches"] for v in report["validation"].values()):
                report["status"] = "validation failed"
                code = 1
    storage.write_bytes(storage.join(out, REPORT_FILE), json.dumps(report, indent=1).encode())
    return code


def _chunks(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]
