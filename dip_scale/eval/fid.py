"""FID of one model file: class-balanced samples from the paper's sampler, streamed through
clean-fid's Inception into running statistics, compared with reference statistics by clean-fid's
`frechet_distance`. The result is stored with its whole protocol (docs/evaluation.md).

    python -m dip_scale.eval.fid MODEL_FILE --reference REF.npz \\
        --inception /opt/dip_scale/weights/inception-2015-12-05.pt --out RESULT.json \\
        [--num-samples 50000 --batch-size 125 --feature-mode legacy_tensorflow \\
         --method euler --steps 100 --cfg-scale 2.9 --cfg-interval 0.03,0.89 --seed 0 --grid G.png]

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


def _shard_features(rank: int, world: int, dev: torch.device, model_file: str, inception: str, feature_mode: str,
                    num_samples: int, batch_size: int, sampler: SamplerConfig, seed: int, grid: Optional[str],
                    progress: bool):
    """Statistics of this process's share of the samples (batches rank, rank + world, ...) and
    the model file's metadata. Sample i always gets label eval_labels(...)[i] and noise seed
    seed + i, so the samples (and, up to float summation order, the FID) do not depend on the
    number of processes."""
    from tqdm.auto import tqdm

    from dip_scale.diffusion.sampler import sample, to_uint8
    from dip_scale.eval.features import FeatureStats, load_feature_extractor
    from dip_scale.models.export import read_model_file
    from dip_scale.visual import image_grid

    model, model_cfg, meta = read_model_file(model_file)
    model = model.to(dev)
    extract = load_feature_extractor(inception, feature_mode, dev)
    k = model_cfg.num_classes
    labels = eval_labels(num_samples, k, seed)
    stats = FeatureStats()
    starts = list(range(0, len(labels), batch_size))[rank::world]
    bar = tqdm(total=len(labels), desc=f"FID samples ({world} process{'es' if world > 1 else ''})", unit="img",
               disable=not progress or rank != 0)
    for start in starts:
        batch = labels[start : start + batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            images = sample(model, torch.tensor(batch, device=dev), list(range(seed + start, seed + start + len(batch))),
                            image_size=model_cfg.image_size, null_class=k, steps=sampler.steps, method=sampler.method,
                            cfg_scale=sampler.cfg_scale, cfg_interval=sampler.cfg_interval)
        stats.add(extract(to_uint8(images).numpy()))
        if start == 0 and grid:
            buf = io.BytesIO()
            image_grid(images[:32].float().cpu(), titles=[str(c) for c in batch[:32]]).save(buf, format="PNG")
            storage.write_bytes(grid, buf.getvalue())
        bar.update(len(batch) * world)  # the other processes move at the same pace
    bar.close()
    return stats, meta


def _worker(rank: int, world: int, on_gpu: bool, out_dir: str, kwargs: dict) -> None:
    """One spawned process: its share of the samples -> out_dir/<rank>.npz (n, Σf, Σffᵀ)."""
    if on_gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dev = torch.device(f"cuda:{rank}" if on_gpu else "cpu")
    stats, meta = _shard_features(rank, world, dev, **kwargs)
    stats.save(os.path.join(out_dir, f"{rank}.npz"))
    if rank == 0:
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f)


def evaluate(
    model_file: str,
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
) -> dict:
    """-> the result record (FID + protocol). `processes`: sampling processes, one per GPU
    (0: every visible GPU, 1 on CPU). `grid`: also write the first batch as a PNG there."""
    from cleanfid.fid import frechet_distance

    from dip_scale.eval.features import FeatureStats, load_reference, reference_problem, sha256_of
    from dip_scale.models.export import read_model_header

    t0 = time.time()
    dev = resolve_device(device)
    mu_ref, sigma_ref, ref_meta = load_reference(reference)  # cheap checks first
    inception_sha256 = sha256_of(inception)
    image_size = None if storage.is_s3(model_file) else read_model_header(model_file)[0].image_size
    problem = reference_problem(reference, ref_meta, inception_sha256=inception_sha256, feature_mode=feature_mode,
                                image_size=image_size, foreign=foreign_reference)
    if problem:
        raise ValueError(problem)
    world = processes or (torch.cuda.device_count() if dev.type == "cuda" else 1)
    if dev.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"{world} processes requested but only {torch.cuda.device_count()} GPU(s) are visible")
    kwargs = dict(model_file=model_file, inception=inception, feature_mode=feature_mode, num_samples=num_samples,
                  batch_size=batch_size, sampler=sampler, seed=seed, grid=grid, progress=progress)
    if world == 1:
        stats, meta = _shard_features(0, 1, dev, **kwargs)
    else:
        import tempfile

        import torch.multiprocessing as mp

        stats = FeatureStats()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, dev.type == "cuda", tmp, kwargs), nprocs=world, join=True)
            for rank in range(world):
                stats.merge(FeatureStats.load(os.path.join(tmp, f"{rank}.npz")))
            with open(os.path.join(tmp, "meta.json")) as f:
                meta = json.load(f)
    mu, sigma = stats.mean_cov()
    fid = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
    return {
        "fid": fid,
        "step": int(meta["step"]) if "step" in meta else None,
        "epoch": int(meta["epoch"]) if "epoch" in meta else None,
        "run_name": meta.get("run_name"),
        "model_file": model_file,
        "num_samples": num_samples,
        "feature_mode": feature_mode,
        "inception": {"path": inception, "sha256": inception_sha256},
        "reference": {"path": reference, **ref_meta, "foreign": foreign_reference},
        "sampler": {"method": sampler.method, "steps": sampler.steps, "cfg_scale": sampler.cfg_scale, "cfg_interval": list(sampler.cfg_interval)},
        "seed": seed,
        "device": str(dev),
        "processes": world,
        "seconds": round(time.time() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command(model_file: str, out: str, ev: EvalConfig, sampler: SamplerConfig, grid: Optional[str] = None) -> list[str]:
    """The argv of an eval job for `model_file`, from the experiment's eval and sampler sections
    (`python` as in the image; the local backend swaps in its own interpreter)."""
    argv = ["python", "-m", "dip_scale.eval.fid", model_file, "--reference", ev.reference_stats, "--inception", ev.inception_weights,
            "--out", out, "--num-samples", str(ev.num_samples), "--batch-size", str(ev.batch_size),
            "--feature-mode", ev.feature_mode, "--method", sampler.method, "--steps", str(sampler.steps),
            "--cfg-scale", str(sampler.cfg_scale), "--cfg-interval", ",".join(map(str, sampler.cfg_interval)),
            "--seed", str(ev.seed), "--device", ev.device, "--processes", str(ev.processes)]
    return argv + (["--grid", grid] if grid else []) + (["--foreign-reference"] if ev.foreign_reference else [])


def main(argv=None) -> int:
    e, s = EvalConfig(), SamplerConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_file")
    ap.add_argument("--reference", required=True, help=".npz with mu and sigma (local or s3://)")
    ap.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt")
    ap.add_argument("--out", required=True, help="result JSON (local or s3://)")
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
    if args.num_samples < 2 or args.batch_size < 1 or args.processes < 0:
        ap.error("--num-samples must be >= 2, --batch-size >= 1 and --processes >= 0")
    try:
        lo, hi = (float(x) for x in args.cfg_interval.split(","))
    except ValueError:
        ap.error(f"--cfg-interval: expected low,high (e.g. 0.03,0.89), got {args.cfg_interval!r}")
    sampler = SamplerConfig(method=args.method, steps=args.steps, cfg_scale=args.cfg_scale, cfg_interval=[lo, hi])
    try:
        result = evaluate(args.model_file, args.reference, args.inception, num_samples=args.num_samples,
                          batch_size=args.batch_size, feature_mode=args.feature_mode, sampler=sampler,
                          seed=args.seed, device=args.device, processes=args.processes, grid=args.grid,
                          foreign_reference=args.foreign_reference)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"dip_scale.eval.fid: {err}", file=sys.stderr)
        return 2
    storage.write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"FID {result['fid']:.3f} ({args.num_samples} samples, {args.feature_mode}) -> {args.out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
