"""The embedded default, end to end on a CPU machine (README command 1):

  1. build an ImageNet-layout folder offline: one class per scikit-image sample photograph,
     filled with random crops (dip-demo-data)           -> data/demo-imagenet/
  2. convert it to MDS shards at 64x64 (dip-convert) -> data/demo-mds/
  3. FID reference statistics of the training split, with a stand-in for clean-fid's Inception
     (the real weights cannot be downloaded here; dip-standin-inception)
                                                                  -> data/demo-fid/, data/demo-weights/
  4. train yamls/dip_tiny_cpu.yaml with DeepSpeed ZeRO-2 on 2 CPU processes under the real
     `composer` launcher, EMA sample grids along the way, an FID job (local child process) at
     every checkpoint                                             -> runs/dip-tiny-cpu/
  5. plot the loss curve and say where everything is.

    python tools/demo.py [--steps 800] [--nproc 2] [key.path=value ...]

Steps 1-3 are skipped when their output exists; training resumes from its last checkpoint when
re-run (use --fresh to start over). Extra key=value arguments override the YAML.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: yamls/, data/, runs/


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="training batches (default: the YAML's trainer.max_duration)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (composer -n)")
    ap.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    args, overrides = ap.parse_known_args(argv)
    os.chdir(ROOT)
    python, bindir = sys.executable, os.path.dirname(sys.executable)
    src, mds = os.path.join("data", "demo-imagenet"), os.path.join("data", "demo-mds")

    from dip_scale.config import ConfigError, load_config

    yaml_path = os.path.join("yamls", "dip_tiny_cpu.yaml")
    if args.steps is not None:
        overrides = [f"trainer.max_duration={args.steps}ba", *overrides]
    try:
        cfg = load_config(yaml_path, overrides)
    except ConfigError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2

    step("1/5 demo ImageNet folder from scikit-image's sample photographs")
    if os.path.isdir(os.path.join(src, "train")):
        print(f"{src} exists, kept")
    else:
        subprocess.run([python, "-m", "dip_scale.data.demo_tree", "--out", src, "--classes", str(cfg.model.num_classes)], check=True)

    step("2/5 convert to MDS shards (ADM centre crop to 64x64, lossless PNG)")
    if os.path.isfile(os.path.join(mds, "dataset.json")):
        print(f"{mds} exists, kept")
    else:
        subprocess.run([python, "-m", "dip_scale.cli.convert", "--src", src, "--out", mds, "--splits", "train",
                        "--resolution", str(cfg.model.image_size), "--workers", str(min(2, os.cpu_count() or 1))], check=True)

    step("3/5 reference statistics (stand-in Inception: the metrics show the trend, not paper numbers)")
    ev = cfg.eval
    if ev.backend != "none":
        import torch

        from dip_scale.eval.features import InceptionFeatures, load_reference_set

        try:  # a stand-in from an older demo may lack the layout the metric suite reads
            InceptionFeatures(ev.inception_weights, ev.feature_mode, torch.device("cpu"))
            current = True
        except (FileNotFoundError, ValueError):
            subprocess.run([python, "-m", "dip_scale.eval.standin_inception", "--out", ev.inception_weights], check=True)
            current = False
        if current and os.path.isfile(ev.reference_stats) and not load_reference_set(ev.reference_stats).missing_for(ev.metrics):
            print(f"{ev.reference_stats} exists, kept")
        else:
            subprocess.run([python, "-m", "dip_scale.cli.fid_stats", "--data", mds, "--split", "train", "--inception", ev.inception_weights,
                            "--out", ev.reference_stats, "--feature-mode", ev.feature_mode, "--device", "cpu"], check=True)

    step(f"4/5 train {yaml_path} for {cfg.trainer.max_duration}: DeepSpeed ZeRO-{cfg.deepspeed['zero_optimization']['stage']} on {args.nproc} CPU processes")
    run_dir = cfg.resolved_run_dir
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    proc = subprocess.run([os.path.join(bindir, "composer"), "-n", str(args.nproc), "dip_scale/train.py", yaml_path, *overrides])
    if proc.returncode:
        print(f"demo: training failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    step("5/5 results")
    from dip_scale import naming
    from dip_scale.visual import plot_metrics

    metrics = os.path.join(run_dir, naming.RUN_METRICS)
    curve = plot_metrics(metrics, os.path.join(run_dir, naming.RUN_LOSS_PLOT))
    grids = naming.grid_steps(os.listdir(os.path.join(run_dir, naming.SAMPLES_DIR)))
    print(f"loss curve:        {curve}")
    print(f"EMA sample grids:  {', '.join(os.path.join(run_dir, naming.grid(s)) for s in grids)}")
    print(f"metrics per step:  {metrics}")
    save_folder = cfg.trainer.save_folder.replace("{run_name}", cfg.run_name)
    eval_dir = os.path.join(save_folder, naming.EVAL_DIR)
    results = [json.load(open(os.path.join(eval_dir, f))) for f in sorted(os.listdir(eval_dir)) if f.endswith(".json")] if os.path.isdir(eval_dir) else []
    if results:
        from dip_scale.eval.fid import results_table

        print(f"evaluation per checkpoint: {os.path.join(run_dir, naming.RUN_EVAL_PLOT)}  (results + sample grids: {eval_dir}/)")
        print("stand-in Inception network (no weights can be downloaded here): the numbers show the trend, not paper values")
        print(results_table(results))
    print(f"EMA weights:       {os.path.join(save_folder, naming.EMA_DIR)}/  (dip-sample <file> --out grid.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
