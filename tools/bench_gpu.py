"""One command for whoever holds a GPU: training throughput and MFU, latency, sampling, eval
features and data loading of DiP-XL/16 @256, one table + one JSON line (≤ 8 minutes on one
H100/H200-class GPU).

    python tools/bench_gpu.py [--peak-flops 989e12] [--data s3://.../imagenet-mds-256] [--inception W.pt]
    python tools/bench_gpu.py --set model.preset=L/16 model.head.placement=hybrid --batches 64,128
    python tools/bench_gpu.py --tiny --device cpu      # the same code path in CI, in under two minutes

* train: the DeepSpeed engine the paper config builds (ZeRO-2; bf16 parameters with fp32 masters
  on a GPU, fp32 on a CPU), AdamW, synthetic uint8 images (or --data shards), per-GPU batch 32 and
  64, eager and `torch.compile`; img/s, MFU = 6 x trained MACs x img/s / --peak-flops (REPA off:
  the frozen encoder is not trained), peak memory.
* latency: DiT-only vs DiP forward at batch 1 and throughput at batch 64 (paper: 0.88 s vs 0.92 s).
* sampling: Euler 100 steps with CFG 2.9 on the paper interval, img/s.
* features: the eval job's Inception feature extraction, img/s (a stand-in net unless --inception).
* loader: img/s of one DataLoader worker reading the MDS shards (demo shards unless --data).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS of this process


def _init_single_process(device) -> None:
    """DeepSpeed needs a process group, even for one GPU."""
    import deepspeed

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def bench_train(model_cfg, objective_cfg, batch: int, compile_: bool, device, steps: int, peak_flops: float, images=None) -> dict:
    import deepspeed

    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.models import build_model
    from dip_scale.models.summary import trained_macs_per_image
    from dip_scale.training.composer_model import DiPComposerModel
    from dip_scale.training.deepspeed import skip_cpu_shm_op

    skip_cpu_shm_op()
    _init_single_process(device)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    t0 = time.perf_counter()
    if compile_:
        model.compile_trunk()
    macs = trained_macs_per_image(model_cfg)
    cm = DiPComposerModel(model, FlowMatchingObjective(objective_cfg, model_cfg.num_classes), macs).to(device)
    bf16 = device.type == "cuda"
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=cm, optimizer=optimizer, config=config)
    s = model_cfg.image_size
    if images is None:
        images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    x = images[:batch].to(device)
    y = torch.randint(0, model_cfg.num_classes, (batch,), device=device)

    def step():
        loss = engine((x, y))["total"]
        engine.backward(loss)
        engine.step()

    step()  # the first step compiles when compile_ is on
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, device, warmup=3, repeats=steps)
    ips = batch / seconds
    row = {"batch": batch, "compile": compile_, "img_per_s": round(ips, 2), "step_ms": round(seconds * 1e3, 1),
           "mfu": float(f"{6 * macs * ips / peak_flops:.4g}"), "peak_mem_gib": round(_peak_memory_gib(device), 2),
           "first_step_s": round(first, 1)}
    del engine, optimizer, cm, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_latency(model_cfg, device, batch_tp: int, repeats: int) -> dict:
    import dataclasses

    from dip_scale.models import build_model

    out = {}
    for head in ("none", "conv_unet"):
        cfg = dataclasses.replace(model_cfg, head=dataclasses.replace(model_cfg.head, type=head))
        model = build_model(cfg).to(device).eval()
        s = cfg.image_size
        for b in (1, batch_tp):
            x = torch.randn(b, 3, s, s, device=device)
            t = torch.rand(b, device=device)
            y = torch.zeros(b, dtype=torch.long, device=device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                sec = _timed(lambda: model(x, t, y), device, warmup=2, repeats=repeats)
            key = "dit_only" if head == "none" else "dip"
            out[f"{key}_b{b}_ms"] = round(sec * 1e3, 2)
            if b > 1:
                out[f"{key}_b{b}_img_per_s"] = round(b / sec, 1)
        del model
    out["dip_over_dit_b1"] = round(out["dip_b1_ms"] / out["dit_only_b1_ms"], 3)
    return out


def bench_sampling(model_cfg, sampler_cfg, device, batch: int, steps: int) -> dict:
    from dip_scale.diffusion.sampler import sample
    from dip_scale.models import build_model

    model = build_model(model_cfg).to(device).eval()
    labels = torch.arange(batch, device=device) % model_cfg.num_classes

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sample(model, labels, list(range(batch)), image_size=model_cfg.image_size, null_class=model_cfg.num_classes,
                   steps=steps, method="euler", cfg_scale=sampler_cfg.cfg_scale, cfg_interval=sampler_cfg.cfg_interval)

    sec = _timed(run, device, warmup=1, repeats=1)
    return {"steps": steps, "batch": batch, "img_per_s": round(batch / sec, 3), "s_per_batch": round(sec, 2)}


def bench_features(inception: str, device, batch: int, size: int) -> dict:
    import numpy as np

    from dip_scale.eval.features import load_feature_extractor

    extract = load_feature_extractor(inception, "legacy_tensorflow", device)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    sec = _timed(lambda: extract(images), device, warmup=1, repeats=3)
    return {"batch": batch, "img_per_s": round(batch / sec, 1)}


def bench_loader(data: str, images: int) -> dict:
    from torch.utils.data import DataLoader

    from dip_scale.config import DataConfig
    from dip_scale.data.streaming import build_dataset

    with tempfile.TemporaryDirectory() as cache:
        ds = build_dataset(DataConfig(remote=data, shuffle=False), device_batch_size=16, seed=0, cache_dir=cache)
        loader = DataLoader(ds, batch_size=16, num_workers=1)
        n, t0 = 0, None
        for i, (x, *_) in enumerate(loader):
            if i == 1:
                t0, n = time.perf_counter(), 0  # the worker's start-up is not throughput
            n += x.shape[0]
            if n >= images and t0 is not None:
                break
        if t0 is None or n == 0:
            raise SystemExit(f"--data {data}: too few images to time the loader (it needs at least 2 batches of 16)")
        sec = time.perf_counter() - t0
    return {"workers": 1, "img_per_s_per_worker": round(n / sec, 1), "images": n}


def _demo_inputs(workdir: str) -> tuple[str, str]:
    """Offline stand-ins: demo MDS shards and the stand-in Inception (built once in workdir)."""
    import subprocess

    from dip_scale.data import demo_tree
    from dip_scale.eval import standin_inception

    inception = os.path.join(workdir, "inception-2015-12-05.pt")
    if not os.path.exists(inception):
        standin_inception.write(inception)
    mds = os.path.join(workdir, "mds")
    if not os.path.exists(os.path.join(mds, "train", "index.json")):
        demo_tree.make(os.path.join(workdir, "tree"), classes=4, train_per_class=64, val_per_class=1,
                            val_layout="folders", oddities=False, seed=0)
        subprocess.run([sys.executable, "-m", "dip_scale.cli.convert", "--src", os.path.join(workdir, "tree"),
                        "--out", mds, "--splits", "train", "--resolution", "64", "--workers", "1"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return mds, inception


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny preset at 64 px with small batches (CI, CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--peak-flops", type=float, default=989e12, help="per-device dense bf16 peak (H100 SXM: 989e12)")
    ap.add_argument("--data", default=None, help="MDS shards (converter output) for the loader row; default: demo shards")
    ap.add_argument("--inception", default=None, help="inception-2015-12-05.pt for the features row; default: a stand-in")
    ap.add_argument("--workdir", default=None, help="where the offline stand-ins are built, kept for the next run (default: a temp folder, removed at exit)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides of the benchmarked model, "
                    "e.g. model.preset=L/16 model.image_size=512 (validated like the trainer's)")
    ap.add_argument("--batches", default=None, help="per-GPU training batch sizes, comma-separated (default: 32,64; --tiny: 4,8)")
    args = ap.parse_args(argv)
    from dip_scale.config import load_config_or_exit

    device = torch.device(args.device)
    if args.tiny:
        # two blocks: compiling costs a CPU minutes per distinct graph
        cfg = load_config_or_exit([os.path.join(ROOT, "yamls", "dip_tiny_cpu.yaml"), "logging.sample_classes=[0]", "model.depth=2", *args.set], ap.format_usage())
        batches, steps, tp, sample_batch, sample_steps, feat_batch, loader_n = (4, 8), 5, 8, 4, 10, 8, 64
    else:
        cfg = load_config_or_exit([os.path.join(ROOT, "yamls", "dip_xl16_600ep.yaml"), *args.set], ap.format_usage())
        batches, steps, tp, sample_batch, sample_steps, feat_batch, loader_n = (32, 64), 10, 64, 64, 100, 250, 2000
    if args.batches:
        try:
            batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            ap.error(f"--batches {args.batches!r}: comma-separated integers, e.g. 32,64")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-gpu-")
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    need_demo = args.data is None or args.inception is None
    demo_mds, demo_inception = _demo_inputs(workdir) if need_demo else (None, None)
    data, inception = args.data or demo_mds, args.inception or demo_inception

    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": cfg.model.preset,
                    "image_size": cfg.model.image_size, "peak_flops": args.peak_flops, "train": []}
    for b in batches:
        result["train"].append(bench_train(cfg.model, cfg.objective, b, False, device, steps, args.peak_flops))
    # compiled: every batch size on a GPU; on --tiny only the first (each size is a compile of its own)
    for b in [] if args.no_compile else batches[:1] if args.tiny else batches:
        result["train"].append(bench_train(cfg.model, cfg.objective, b, True, device, steps, args.peak_flops))
    result["latency"] = bench_latency(cfg.model, device, tp, repeats=steps)
    result["sampling"] = bench_sampling(cfg.model, cfg.sampler, device, sample_batch, sample_steps)
    result["features"] = bench_features(inception, device, feat_batch, cfg.model.image_size)
    result["loader"] = bench_loader(data, loader_n)

    print(f"{result['device']}: {cfg.model.preset} @{cfg.model.image_size}, MFU vs {args.peak_flops:.3g} FLOP/s")
    print(f"{'train':<8} {'batch':>5} {'compile':>7} {'img/s':>9} {'step ms':>9} {'MFU':>7} {'peak GiB':>9} {'1st step s':>10}")
    for r in result["train"]:
        print(f"{'':<8} {r['batch']:>5} {str(r['compile']):>7} {r['img_per_s']:>9} {r['step_ms']:>9} {r['mfu'] * 100:>6.3g}% "
              f"{r['peak_mem_gib']:>9} {r['first_step_s']:>10}")
    lat = result["latency"]
    print(f"latency  DiT-only b1 {lat['dit_only_b1_ms']} ms, DiP b1 {lat['dip_b1_ms']} ms (x{lat['dip_over_dit_b1']}); "
          f"b{tp}: DiT-only {lat[f'dit_only_b{tp}_img_per_s']} img/s, DiP {lat[f'dip_b{tp}_img_per_s']} img/s")
    smp = result["sampling"]
    print(f"sampling Euler {smp['steps']} steps + CFG, batch {smp['batch']}: {smp['img_per_s']} img/s")
    print(f"features Inception (eval job), batch {result['features']['batch']}: {result['features']['img_per_s']} img/s"
          + (" (stand-in net)" if args.inception is None else ""))
    print(f"loader   1 worker: {result['loader']['img_per_s_per_worker']} img/s" + (" (demo shards)" if args.data is None else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
