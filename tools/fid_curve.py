"""FID curve of a run from the results its eval jobs left next to the checkpoints.

    python tools/fid_curve.py s3://bkt/runs/dip-xl16-600ep/checkpoints [--out fid.png]

Reads every `<save_folder>/eval/*.json` (local or s3://), prints one row per checkpoint (step,
FID, samples, feature mode, sampler) and draws FID against step as a PNG. Useful once Kubernetes
eval Jobs have finished after training ended (the run's own <run_dir>/fid.png stops with it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("save_folder", help="the run's trainer.save_folder (run name filled in)")
    ap.add_argument("--out", default="fid.png")
    args = ap.parse_args(argv)

    from dip_scale import storage
    from dip_scale.visual import plot_fid

    results = []
    for path in storage.list_keys(storage.join(args.save_folder, "eval")):
        if path.endswith(".json"):
            results.append(json.loads(storage.read_bytes(path)))
    if not results:
        print(f"fid_curve: no eval results under {storage.join(args.save_folder, 'eval')}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r["step"])
    print(f"{'step':>10} {'epoch':>6} {'FID':>9} {'samples':>8}  features           sampler")
    for r in results:
        s = r["sampler"]
        print(f"{r['step']:>10} {r['epoch']:>6} {r['fid']:>9.3f} {r['num_samples']:>8}  {r['feature_mode']:<18} "
              f"{s['method']} {s['steps']} steps, CFG {s['cfg_scale']} on t in {s['cfg_interval']}")
    print(plot_fid({r["step"]: r["fid"] for r in results}, args.out, title=results[-1].get("run_name")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
