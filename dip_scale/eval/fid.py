"""The paper's Table 1 for one model file in one sampling pass: FID, sFID, Inception Score and
improved precision/recall (ADM's evaluator's definitions), from class-balanced samples of the
paper's sampler streamed through clean-fid's Inception. Every number is stored with its whole
protocol (docs/evaluation.md).

    python -m dip_scale.eval.fid MODEL_FILE --reference REF.npz \\
        --inception /opt/dip_scale/weights/inception-2015-12-05.pt --out RESULT.json \\
        [--metrics fid,sfid,is,precision,recall --num-samples 50000 --batch-size 125 \\
         --feature-mode legacy_tensorflow --method euler --steps 100 --cfg-scale 2.9 \\
         --cfg-interval 0.03,0.89 --seed 0 --grid G.png --save-npz SAMPLES.npz]
    python -m dip_scale.eval.fid --samples SAMPLES.npz --reference REF.npz --inception W --out R.json

MODEL_FILE is an EMA export (`<save_folder>/ema/<checkpoint>.safetensors`); every path may be
local or s3://. This is the command the eval dispatcher runs, locally or in a Kubernetes Job.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from dip_scale import storage
from dip_scale.config import EvalConfig, SamplerConfig
from dip_scale.eval.metrics import METRICS


def eval_labels(num_samples: int, num_classes: int, seed: int) -> list[int]:
    """Class-balanced labels (each class num_samples/num_classes times, ±1), in a seeded random
    order so any prefix of the run is balanced too."""
    labels = np.arange(num_samples) % num_classes
    return np.random.default_rng(seed).permutation(labels).tolist()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device 'gpu' requested but no CUDA device is visible")
    return torch.device("cuda" if name == "gpu" else "cpu")


def _shard_metrics(rank: int, world: int, dev: torch.device, model_file: str, inception: str, feature_mode: str,
                   num_samples: int, batch_size: int, sampler: SamplerConfig, seed: int, grid: Optional[str],
                   progress: bool, metrics: tuple[str, ...], sample_store: Optional[str]):
    """Metric state of this process's share of the samples (batches rank, rank + world, ...) and
    the model file's metadata. Sample i always gets label eval_labels(...)[i] and noise seed
    seed + i, so the samples (and, up to float summation order, every metric) do not depend on
    the number of processes. `sample_store`: a folder where this process also keeps its samples
    (`<rank>.npy`, uint8, its batches in order) for an ADM sample batch."""
    from tqdm.auto import tqdm

    from dip_scale.diffusion.sampler import sample, to_uint8
    from dip_scale.eval.features import InceptionFeatures
    from dip_scale.eval.metrics import MetricState
    from dip_scale.models.export import read_model_file
    from dip_scale.visual import image_grid

    model, model_cfg, meta = read_model_file(model_file)
    model = model.to(dev)
    extract = InceptionFeatures(inception, feature_mode, dev)
    k = model_cfg.num_classes
    labels = eval_labels(num_samples, k, seed)
    state = MetricState(metrics)
    starts = list(range(0, len(labels), batch_size))[rank::world]
    store, kept = None, 0
    if sample_store:
        size, mine = model_cfg.image_size, sum(len(labels[s : s + batch_size]) for s in starts)
        store = np.lib.format.open_memmap(os.path.join(sample_store, f"{rank}.npy"), mode="w+", dtype=np.uint8, shape=(mine, size, size, 3))
    bar = tqdm(total=len(labels), desc=f"eval samples ({world} process{'es' if world > 1 else ''})", unit="img",
               disable=not progress or rank != 0)
    for start in starts:
        batch = labels[start : start + batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            images = sample(model, torch.tensor(batch, device=dev), list(range(seed + start, seed + start + len(batch))),
                            image_size=model_cfg.image_size, null_class=k, steps=sampler.steps, method=sampler.method,
                            cfg_scale=sampler.cfg_scale, cfg_interval=sampler.cfg_interval)
        pixels = to_uint8(images).numpy()
        state.add(extract(pixels), start)
        if store is not None:
            store[kept : kept + len(batch)] = pixels
            kept += len(batch)
        if start == 0 and grid:
            buf = io.BytesIO()
            image_grid(images[:32].float().cpu(), titles=[str(c) for c in batch[:32]]).save(buf, format="PNG")
            storage.write_bytes(grid, buf.getvalue())
        bar.update(len(batch) * world)  # the other processes move at the same pace
    bar.close()
    if store is not None:
        store.flush()
    return state, {**meta, "num_classes": k}


def _worker(rank: int, world: int, on_gpu: bool, out_dir: str, kwargs: dict) -> None:
    """One spawned process: its share of the samples -> out_dir/<rank>.npz (its metric state)."""
    if on_gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dev = torch.device(f"cuda:{rank}" if on_gpu else "cpu")
    state, meta = _shard_metrics(rank, world, dev, **kwargs)
    state.save(os.path.join(out_dir, f"{rank}.npz"))
    if rank == 0:
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f)


def parse_metrics(text) -> tuple[str, ...]:
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names or "fid" not in names:
        raise ValueError(f"metrics: {', '.join(bad) or 'fid missing'}; choose from {', '.join(METRICS)} (fid always included)")
    return tuple(m for m in METRICS if m in names)


def write_adm_npz(path: str, chunks, shape: tuple[int, ...], labels: Optional[np.ndarray] = None) -> None:
    """A sample batch in ADM's format (`arr_0` uint8 N x H x W x 3, `arr_1` the labels), streamed
    from `chunks` (uint8 arrays in sample order; 50k samples at 256 px are 9.8 GB), local or s3://."""
    import tempfile
    import zipfile

    def write(local: str) -> None:
        with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": tuple(shape)})
                for chunk in chunks:
                    f.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels), allow_pickle=False)

    if not storage.is_s3(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(path + ".part")
        os.replace(path + ".part", path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(os.path.join(tmp, "samples.npz"))
        storage.upload_file(os.path.join(tmp, "samples.npz"), path)


def _stored_samples(folder: str, world: int, num_samples: int, batch_size: int):
    """The samples the processes kept (sample_store), back in sample order: batch b is the
    (b // world)-th batch of process b % world."""
    stores = [np.load(os.path.join(folder, f"{r}.npy"), mmap_mode="r") for r in range(world)]
    offsets = [0] * world
    for b, start in enumerate(range(0, num_samples, batch_size)):
        r, n = b % world, min(batch_size, num_samples - start)
        yield stores[r][offsets[r] : offsets[r] + n]
        offsets[r] += n


def read_sample_batch(path: str) -> np.ndarray:
    data = storage.read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"sample batch not found: {path}")
    if not data.startswith(b"PK"):
        raise ValueError(f"{path}: not an .npz file (expected ADM's sample batch with arr_0)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{path}: no arr_0 (ADM's sample batch holds uint8 images N x H x W x 3 as arr_0); has {', '.join(z.files)}")
        images = z["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def evaluate(
    model_file: Optional[str],
    reference: str,
    inception: str,
    *,
    num_samples: int,
    batch_size: int,
    feature_mode: str,
    sampler: SamplerConfig,
    seed: int = 0,
    device: str = "auto",
    processes: int = 0,
    grid: Optional[str] = None,
    progress: bool = True,
    foreign_reference: bool = False,
    metrics: tuple[str, ...] = METRICS,
    samples: Optional[str] = None,
    save_npz: Optional[str] = None,
) -> dict:
    """-> the result record (the metrics + their protocol). Samples come from `model_file` with
    the sampler, or, with `samples`, from an ADM-format sample batch (.npz, arr_0). `processes`:
    sampling processes, one per GPU (0: every visible GPU, 1 on CPU). `grid`: also write the first
    batch as a PNG there. `save_npz`: also write the samples as an ADM sample batch."""
    import tempfile

    from dip_scale.eval.features import InceptionFeatures, load_reference_set, reference_problem, sha256_of
    from dip_scale.eval.metrics import MetricState, frechet, precision_recall
    from dip_scale.models.export import read_model_header

    t0 = time.time()
    dev = resolve_device(device)
    metrics = parse_metrics(metrics)
    ref = load_reference_set(reference)  # cheap checks first
    inception_sha256 = sha256_of(inception)
    given = read_sample_batch(samples) if samples else None
    if given is not None:
        image_size = given.shape[1]
    else:
        image_size = None if storage.is_s3(model_file) else read_model_header(model_file)[0].image_size
    problem = reference_problem(reference, ref.meta, inception_sha256=inception_sha256, feature_mode=feature_mode,
                                image_size=image_size, foreign=foreign_reference)
    if not problem and ref.missing_for(metrics):
        problem = f"{reference} cannot serve {'; '.join(ref.missing_for(metrics))}: rebuild it with dip-fid-stats or drop those metrics (eval.metrics)"
    if problem:
        raise ValueError(problem)
    world = 1 if given is not None else processes or (torch.cuda.device_count() if dev.type == "cuda" else 1)
    if dev.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"{world} processes requested but only {torch.cuda.device_count()} GPU(s) are visible")
    meta: dict = {}
    extract = None  # the parent's own network, built once when it needs one
    with tempfile.TemporaryDirectory() as tmp:
        if given is not None:
            extract = InceptionFeatures(inception, feature_mode, dev)
            state = MetricState(metrics)
            for start in range(0, len(given), batch_size):
                state.add(extract(given[start : start + batch_size]), start)
            num_samples = len(given)
        else:
            store = tmp if save_npz else None
            kwargs = dict(model_file=model_file, inception=inception, feature_mode=feature_mode, num_samples=num_samples,
                          batch_size=batch_size, sampler=sampler, seed=seed, grid=grid, progress=progress, metrics=metrics,
                          sample_store=store)
            if world == 1:
                state, meta = _shard_metrics(0, 1, dev, **kwargs)
            else:
                import torch.multiprocessing as mp

                mp.spawn(_worker, args=(world, dev.type == "cuda", tmp, kwargs), nprocs=world, join=True)
                state = MetricState(metrics)
                for rank in range(world):
                    state.merge(MetricState.load(os.path.join(tmp, f"{rank}.npz")))
                with open(os.path.join(tmp, "meta.json")) as f:
                    meta = json.load(f)
            if save_npz:
                first = np.load(os.path.join(tmp, "0.npy"), mmap_mode="r")
                labels = np.asarray(eval_labels(num_samples, int(meta["num_classes"]), seed), np.int64)
                write_adm_npz(save_npz, _stored_samples(tmp, world, num_samples, batch_size), (num_samples, *first.shape[1:]), labels)
                del first
        values: dict = {"fid": frechet(state.pool, ref.mu, ref.sigma)}
        if "sfid" in metrics:
            values["sfid"] = frechet(state.spatial, ref.mu_s, ref.sigma_s)
        if "is" in metrics:
            values["is"] = state.inception_score.score()
        t_pr = None
        if state.keeps_features:
            ref_feats = ref.pr_features
            if ref_feats is None:  # ADM's reference batch: the features of its images, by the same network
                extract = extract or InceptionFeatures(inception, feature_mode, dev)
                ref_feats = np.concatenate([extract(ref.images[i : i + batch_size])["pool"] for i in range(0, len(ref.images), batch_size)])
            t_pr = time.time()
            precision, recall = precision_recall(ref_feats, state.sample_features(), device=dev)
            t_pr = round(time.time() - t_pr, 1)
            values.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in metrics})
    return {
        **values,
        "metrics": list(metrics),
        "step": int(meta["step"]) if "step" in meta else None,
        "epoch": int(meta["epoch"]) if "epoch" in meta else None,
        "run_name": meta.get("run_name"),
        "model_file": model_file,
        "samples": {"path": samples, "sha256": sha256_of(samples)} if samples else None,
        "save_npz": save_npz,
        "num_samples": num_samples,
        "feature_mode": feature_mode,
        "inception": {"path": inception, "sha256": inception_sha256},
        "reference": {"path": reference, **ref.meta, "foreign": foreign_reference},
        "sampler": None if samples else {"method": sampler.method, "steps": sampler.steps, "cfg_scale": sampler.cfg_scale,
                                         "cfg_interval": list(sampler.cfg_interval)},
        "protocol": {"is_split": 5000, "pr_k": 3, "pr_distances": "squared Euclidean, float32", "spatial": "mixed_6/conv[..., :7], HWC order"},
        "seed": None if samples else seed,
        "device": str(dev),
        "processes": world,
        "seconds": round(time.time() - t0, 1),
        "seconds_precision_recall": t_pr,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command(model_file: str, out: str, ev: EvalConfig, sampler: SamplerConfig, grid: Optional[str] = None,
            save_npz: Optional[str] = None) -> list[str]:
    """The argv of an eval job for `model_file`, from the experiment's eval and sampler sections
    (`python` as in the image; the local backend swaps in its own interpreter)."""
    argv = ["python", "-m", "dip_scale.eval.fid", model_file, "--reference", ev.reference_stats, "--inception", ev.inception_weights,
            "--out", out, "--num-samples", str(ev.num_samples), "--batch-size", str(ev.batch_size),
            "--feature-mode", ev.feature_mode, "--method", sampler.method, "--steps", str(sampler.steps),
            "--cfg-scale", str(sampler.cfg_scale), "--cfg-interval", ",".join(map(str, sampler.cfg_interval)),
            "--seed", str(ev.seed), "--device", ev.device, "--processes", str(ev.processes), "--metrics", ",".join(ev.metrics)]
    return (argv + (["--grid", grid] if grid else []) + (["--foreign-reference"] if ev.foreign_reference else [])
            + (["--save-npz", save_npz] if save_npz else []))


def main(argv=None) -> int:
    e, s = EvalConfig(), SamplerConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_file", nargs="?", help="model file (EMA export); omit with --samples")
    ap.add_argument("--samples", default=None, help="evaluate this ADM-format sample batch (.npz with arr_0) instead of sampling")
    ap.add_argument("--reference", required=True, help=".npz with mu and sigma (+ mu_s, sigma_s, arr_0 or pr_features), local or s3://")
    ap.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt")
    ap.add_argument("--out", required=True, help="result JSON (local or s3://)")
    ap.add_argument("--metrics", default=",".join(e.metrics), help="comma-separated: fid,sfid,is,precision,recall (fid always)")
    ap.add_argument("--save-npz", default=None, help="also write the samples as an ADM sample batch (arr_0, arr_1), local or s3://")
    ap.add_argument("--grid", default=None, help="PNG of the first samples (local or s3://)")
    ap.add_argument("--num-samples", type=int, default=e.num_samples)
    ap.add_argument("--batch-size", type=int, default=e.batch_size)
    ap.add_argument("--feature-mode", default=e.feature_mode, choices=["legacy_tensorflow", "clean"])
    ap.add_argument("--method", default=s.method, choices=["euler", "heun"])
    ap.add_argument("--steps", type=int, default=s.steps)
    ap.add_argument("--cfg-scale", type=float, default=s.cfg_scale)
    ap.add_argument("--cfg-interval", default=",".join(map(str, s.cfg_interval)), help="low,high in t (t = 1 is noise)")
    ap.add_argument("--seed", type=int, default=e.seed)
    ap.add_argument("--foreign-reference", action="store_true",
                    help="compare with a reference that records no (or another) Inception network, e.g. ADM's VIRTUAL_*.npz")
    ap.add_argument("--device", default=e.device, choices=["auto", "cpu", "gpu"])
    ap.add_argument("--processes", type=int, default=e.processes, help="sampling processes, one per GPU (0: every visible GPU; 1 on CPU)")
    args = ap.parse_args(argv)
    if (args.model_file is None) == (args.samples is None):
        ap.error("give either a model file or --samples SAMPLES.npz")
    if args.samples and args.save_npz:
        ap.error("--save-npz writes sampled images; with --samples they are already in a file")
    if args.num_samples < 2 or args.batch_size < 1 or args.processes < 0:
        ap.error("--num-samples must be >= 2, --batch-size >= 1 and --processes >= 0")
    try:
        lo, hi = (float(x) for x in args.cfg_interval.split(","))
    except ValueError:
        ap.error(f"--cfg-interval: expected low,high (e.g. 0.03,0.89), got {args.cfg_interval!r}")
    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as err:
        ap.error(str(err))
    sampler = SamplerConfig(method=args.method, steps=args.steps, cfg_scale=args.cfg_scale, cfg_interval=[lo, hi])
    try:
        result = evaluate(args.model_file, args.reference, args.inception, num_samples=args.num_samples,
                          batch_size=args.batch_size, feature_mode=args.feature_mode, sampler=sampler,
                          seed=args.seed, device=args.device, processes=args.processes, grid=args.grid,
                          foreign_reference=args.foreign_reference, metrics=metrics, samples=args.samples,
                          save_npz=args.save_npz)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"dip_scale.eval.fid: {err}", file=sys.stderr)
        return 2
    storage.write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{format_metrics(result)} ({result['num_samples']} samples, {args.feature_mode}) -> {args.out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def results_table(results: list[dict]) -> str:
    """The paper's Table 1 layout for a run's results: a row per (checkpoint, guidance scale),
    a column per metric ('-' where a metric was not computed)."""
    cols = (("fid", "FID", 3), ("sfid", "sFID", 3), ("is", "IS", 2), ("precision", "Prec.", 3), ("recall", "Rec.", 3))
    lines = [f"{'step':>10} {'epoch':>6} {'CFG':>5} " + " ".join(f"{label:>8}" for _, label, _ in cols) + f" {'samples':>8}  features"]
    for r in sorted(results, key=lambda r: (r.get("step") or 0, (r.get("sampler") or {}).get("cfg_scale") or 0.0)):
        scale = (r.get("sampler") or {}).get("cfg_scale")
        cells = " ".join(f"{r[k]:>8.{d}f}" if r.get(k) is not None else f"{'-':>8}" for k, _, d in cols)
        lines.append(f"{r.get('step', '-')!s:>10} {r.get('epoch', '-')!s:>6} {'-' if scale is None else f'{scale:g}':>5} {cells} "
                     f"{r['num_samples']:>8}  {r['feature_mode']}")
    return "\n".join(lines)


def format_metrics(result: dict) -> str:
    """'FID 2.31 sFID 4.5 IS 280.1 Prec 0.79 Rec 0.58' for the metrics a result holds."""
    names = (("fid", "FID", 3), ("sfid", "sFID", 3), ("is", "IS", 2), ("precision", "Prec", 3), ("recall", "Rec", 3))
    return " ".join(f"{label} {result[k]:.{d}f}" for k, label, d in names if result.get(k) is not None)


if __name__ == "__main__":
    sys.exit(main())
