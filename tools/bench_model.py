"""Forward latency of DiP vs DiT-only (same trunk), one table.

    python tools/bench_model.py [--preset XL/16] [--image-size 256] [--batch 1] [--heads none,conv_unet]

Median of --repeats timed forwards after --warmup untimed ones, under torch.no_grad, fp32 on the
CPU (or bf16 autocast with --device cuda). The paper's GPU ratio DiP/DiT-only is 0.92 s / 0.88 s
= 1.045 for a whole 100-step sample (Table 2). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dip_scale.config import load_config
from dip_scale.models import build_model
from dip_scale.models.summary import summarize


def time_forward(model, batch: int, size: int, device: str, warmup: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    times = []
    with torch.no_grad(), autocast:
        for i in range(warmup + repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t, y)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="XL/16")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", default="none,conv_unet", help="comma-separated model.head.type values")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    rows = []
    for head in args.heads.split(","):
        cfg = load_config(None, [f"model.preset={args.preset}", f"model.image_size={args.image_size}", f"model.head.type={head}"])
        torch.manual_seed(0)
        model = build_model(cfg.model).to(args.device).eval()
        seconds = time_forward(model, args.batch, args.image_size, args.device, args.warmup, args.repeats)
        s = summarize(cfg.model)
        rows.append({"head": head, "params": s["params"], "gmacs_per_image": round(s["gmacs_per_image"], 2), "forward_ms": round(seconds * 1e3, 1)})
        del model
    base = rows[0]["forward_ms"]
    print(f"{args.preset} {args.image_size}x{args.image_size}, batch {args.batch}, {args.device}, median of {args.repeats}")
    print(f"{'head':<16} {'params M':>9} {'GMACs/img':>10} {'forward ms':>11} {'ratio':>6}")
    for r in rows:
        r["ratio_vs_first"] = round(r["forward_ms"] / base, 3)
        print(f"{r['head']:<16} {r['params'] / 1e6:>9.2f} {r['gmacs_per_image']:>10.2f} {r['forward_ms']:>11.1f} {r['ratio_vs_first']:>6.3f}")
    print(json.dumps({"preset": args.preset, "image_size": args.image_size, "batch": args.batch, "device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
