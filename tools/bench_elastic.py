"""Cost of an elastic resume's conversion: a real 2-process checkpoint of the configured model
is merged and turned into DeepSpeed's universal form exactly as training/elastic.py does, one
table row per preset (checkpoint size, universal size, seconds, bytes per parameter), so the
cost of a larger model follows from its parameter count.

    python tools/bench_elastic.py [--presets tiny/16,B/16] [--image-size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(preset: str, image_size: int, data: str, tmp: str) -> dict:
    from dip_scale.config import load_config
    from dip_scale.models.summary import summarize
    from dip_scale.training.elastic import _ds_to_universal

    ckpt, run_dir = os.path.join(tmp, preset.replace("/", "-"), "ckpt"), os.path.join(tmp, preset.replace("/", "-"), "run")
    overrides = [f"model.preset={preset}", f"model.image_size={image_size}", "model.num_classes=4", "logging.sample_classes=[0]",
                 "model.head.channels=[16,32,64,128]", f"data.remote={data}", "data.batch_size=4", "data.num_workers=0",
                 "trainer.max_duration=2ba", "trainer.save_interval=2ba", f"trainer.save_folder={ckpt}", f"run_dir={run_dir}",
                 "trainer.progress_bar=false", "logging.sample_interval=100ba", "eval.backend=none"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "composer"), "-n", "2", os.path.join(ROOT, "dip_scale", "train.py"),
           os.path.join(ROOT, "yamls", "dip_tiny_cpu.yaml"), *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    tars = sorted(p for p in os.listdir(ckpt) if p.endswith(".tar") and "-rank" in p and not p.startswith("latest"))
    merged, out = os.path.join(tmp, "merged"), os.path.join(tmp, "universal")
    t0 = time.perf_counter()
    for name in tars:
        with tarfile.open(os.path.join(ckpt, name)) as t:
            t.extractall(merged)
    _ds_to_universal(os.path.join(merged, "deepspeed"), os.path.join(out, "deepspeed"))
    with tarfile.open(os.path.join(tmp, "universal.tar"), "w") as t:
        t.add(out, arcname="")
    seconds = time.perf_counter() - t0
    params = summarize(load_config(os.path.join(ROOT, "yamls", "dip_tiny_cpu.yaml"), overrides).model)["params"]
    size = os.path.getsize(os.path.join(tmp, "universal.tar"))
    source = sum(os.path.getsize(os.path.join(ckpt, n)) for n in tars)
    shutil.rmtree(merged)
    shutil.rmtree(out)
    return {"preset": preset, "params": params, "checkpoint_mb": round(source / 1e6, 1), "universal_mb": round(size / 1e6, 1),
            "seconds": round(seconds, 2), "bytes_per_param": round(size / params, 2), "us_per_param": round(seconds / params * 1e6, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny/16,B/16")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "demo-mds"), help="MDS shards at --image-size (tools/demo.py makes the demo's)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            rows.append(bench(preset, args.image_size, args.data, tmp))
    print(f"{'preset':<8} {'params':>12} {'ckpt MB':>9} {'universal MB':>13} {'seconds':>8} {'B/param':>8} {'us/param':>9}")
    for r in rows:
        print(f"{r['preset']:<8} {r['params']:>12,} {r['checkpoint_mb']:>9} {r['universal_mb']:>13} {r['seconds']:>8} "
              f"{r['bytes_per_param']:>8} {r['us_per_param']:>9}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
