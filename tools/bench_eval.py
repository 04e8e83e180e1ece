"""Evaluation throughput: the FID-only pass the eval job used to make against today's one pass that
computes FID, sFID, IS, precision and recall, on the same samples; one table + one JSON line.

    python tools/bench_eval.py [--samples 2000 --batch 100 --device cpu --inception W.pt --pr-n 10000]

* sampling: img/s of the model file's sampler (tiny preset, 4 steps unless --preset/--steps).
* features: img/s of clean-fid's InceptionV3W pool features (the old pass) vs InceptionFeatures
  (pool + mixed_6/conv + logits, the suite's).
* statistics: img/s of the running sums (pool only vs pool + spatial + IS + kept pool features).
* precision/recall: seconds of the k-NN at --pr-n samples against 10k reference features, and
  its extrapolation to 50k samples (the cost grows with samples^2 for the samples' own radii).
The whole-pass ratio (all metrics / FID only) is what the issue bounds at 1.1.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time


def _rate(fn, n: int, repeats: int = 1) -> float:
    """images per second of fn() processing n images (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000, help="images through features and statistics")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--size", type=int, default=256, help="image side (the model's resolution)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--inception", default=None, help="inception-2015-12-05.pt (default: the offline stand-in)")
    ap.add_argument("--mode", default="legacy_tensorflow", choices=["legacy_tensorflow", "clean"])
    ap.add_argument("--preset", default="tiny/16", help="model for the sampling row")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps for the sampling row (paper: 100)")
    ap.add_argument("--pr-n", type=int, default=2000, help="samples for the precision/recall timing")
    ap.add_argument("--pr-ref", type=int, default=10000, help="reference images for the precision/recall timing (ADM: 10k)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    from dip_scale.diffusion.sampler import sample
    from dip_scale.eval.features import FeatureStats, InceptionFeatures
    from dip_scale.eval.metrics import MetricState, precision_recall
    from dip_scale.models import build_model
    from dip_scale.models.spec import ModelConfig

    dev = torch.device(args.device)
    inception = args.inception
    if inception is None:  # the offline stand-in with the real network's layout (timings of its size, not Inception's)
        from dip_scale.eval.standin_inception import write

        scratch = tempfile.mkdtemp(prefix="bench-eval-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        inception = write(os.path.join(scratch, "inception-2015-12-05.pt"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, args.size, args.size, 3), dtype=np.uint8)
    batches = [images[i : i + args.batch] for i in range(0, args.samples, args.batch)]

    # sampling (the part no metric choice changes)
    model = build_model(ModelConfig(preset=args.preset, image_size=args.size, num_classes=1000)).to(dev).eval()
    nb = min(args.batch, 16)
    labels = torch.arange(nb, device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        sampling = _rate(lambda: sample(model, labels, list(range(nb)), image_size=args.size, null_class=1000, steps=args.steps), nb)
    del model

    # the old pass: clean-fid's network, pool features, one FeatureStats
    old_net = InceptionV3W(os.path.dirname(os.path.abspath(inception)), download=False, resize_inside=args.mode == "legacy_tensorflow").to(dev).eval()
    resize = build_resizer(args.mode)

    def old_features(b):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(resize(img))).permute(2, 0, 1).float() for img in b]).to(dev)
        with torch.no_grad():
            return old_net(x).double().cpu().numpy()

    new_net = InceptionFeatures(inception, args.mode, dev)
    old_feats = [old_features(b) for b in batches[:1]]  # warm-up
    new_feats = [new_net(b) for b in batches[:1]]
    feat_old = _rate(lambda: old_feats.__setitem__(slice(None), [old_features(b) for b in batches]), args.samples)
    feat_new = _rate(lambda: new_feats.__setitem__(slice(None), [new_net(b) for b in batches]), args.samples)

    def old_stats():
        s = FeatureStats()
        for f in old_feats:
            s.add(f)

    def new_stats():
        s = MetricState()
        for i, f in enumerate(new_feats):
            s.add(f, i * args.batch)

    stats_old, stats_new = _rate(old_stats, args.samples, 3), _rate(new_stats, args.samples, 3)

    ref = rng.gamma(2.0, 1.0, size=(args.pr_ref, 2048)).astype(np.float32)
    smp = rng.gamma(2.0, 1.0, size=(args.pr_n, 2048)).astype(np.float32)
    t0 = time.perf_counter()
    precision_recall(ref, smp, device=dev)
    pr_s = time.perf_counter() - t0
    # cost ~ distance pairs: N^2 (sample radii) + 2 N R (cross) + R^2 (reference radii)
    pairs = lambda n, r: n * n + 2 * n * r + r * r  # noqa: E731
    pr_50k = pr_s * pairs(50000, 10000) / pairs(args.pr_n, args.pr_ref)

    per_img_old = 1 / sampling + 1 / feat_old + 1 / stats_old
    per_img_new = 1 / sampling + 1 / feat_new + 1 / stats_new + pr_50k / 50000
    rows = {"sampling_img_s": round(sampling, 2), "features_fid_only_img_s": round(feat_old, 1), "features_all_img_s": round(feat_new, 1),
            "stats_fid_only_img_s": round(stats_old, 1), "stats_all_img_s": round(stats_new, 1), "pr_seconds": float(f"{pr_s:.3g}"),
            "pr_n": args.pr_n, "pr_ref": args.pr_ref, "pr_seconds_50k_extrapolated": float(f"{pr_50k:.3g}"),
            "pass_ratio_all_over_fid_only": round(per_img_new / per_img_old, 3),
            "pr_features_memory_mb_50k": round(50000 * 2048 * 4 / 2**20, 1)}
    table = [(stage, f"{a:>12.{d}f}", f"{b:>12.{d}f}") for stage, a, b, d in (
        ("sampling img/s", sampling, sampling, 2), ("features img/s", feat_old, feat_new, 1), ("statistics img/s", stats_old, stats_new, 1))]
    table.append(("P/R k-NN s", f"{'-':>12}", f"{pr_s:>12.2f}  ({args.pr_n} samples vs {args.pr_ref}; 50k vs 10k extrapolated: {pr_50k:.0f} s)"))
    print(f"device {args.device}, {args.size} px, {args.mode}, sampler {args.preset} x {args.steps} steps\n"
          f"{'stage':<22} {'FID only':>12} {'all metrics':>12}\n" + "\n".join(f"{s:<22} {a} {b}" for s, a, b in table))
    print(f"whole pass, all metrics / FID only: {rows['pass_ratio_all_over_fid_only']:.3f} "
          f"(P/R keeps {rows['pr_features_memory_mb_50k']} MB of pool features at 50k)\n{json.dumps(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
