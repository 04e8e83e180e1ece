"""A run's evaluation table and curves from the results its eval jobs left next to the checkpoints.

    dip-fid-curve s3://bkt/runs/dip-xl16-600ep/checkpoints [--out fid.png]

Reads every `<save_folder>/eval/*.json` (local or s3://), prints the paper's Table 1 layout (a row
per checkpoint and guidance scale: FID, sFID, IS, precision, recall) and draws the curves as a PNG
(one panel per metric, one line per scale). Useful once Kubernetes eval Jobs have finished after
training ended (the run's own <run_dir>/fid.png stops with it).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("save_folder", help="the run's trainer.save_folder (run name filled in)")
    ap.add_argument("--out", default="fid.png")
    args = ap.parse_args(argv)

    from dip_scale import storage
    from dip_scale.eval.fid import results_table
    from dip_scale.eval.metrics import METRICS
    from dip_scale.visual import plot_eval

    results = []
    for path in storage.list_keys(storage.join(args.save_folder, "eval")):
        if path.endswith(".json"):
            results.append(json.loads(storage.read_bytes(path)))
    if not results:
        print(f"fid_curve: no eval results under {storage.join(args.save_folder, 'eval')}", file=sys.stderr)
        return 2
    print(results_table(results))
    rows = [{"step": r["step"], "cfg_scale": (r.get("sampler") or {}).get("cfg_scale"),
             **{k: r[k] for k in METRICS if r.get(k) is not None}} for r in results]
    print(plot_eval(rows, args.out, title=results[-1].get("run_name")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
