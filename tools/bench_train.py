"""Training-step cost of the framework on this machine, one table: median step time of the tiny
preset (yamls/dip_tiny_cpu.yaml) under Composer + DeepSpeed ZeRO 1/2/3 on 2 CPU processes, next
to a bare PyTorch loop doing the same per-rank work (forward, backward, AdamW on one process:
the difference is Composer + DeepSpeed + gloo overhead), and the peak RSS of each rank.

    python tools/bench_train.py [--steps 80] [--stages 1,2,3]

Needs the demo data (python tools/demo.py, or tools/make_demo_data.py + convert).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes whose command line holds `marker`."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in c for c in cmd) and any(c.endswith(b"train.py") for c in cmd):
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(pid)
    return out


def _hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bench_stage(stage: int, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, f"bench-zero{stage}")
        cmd = [os.path.join(os.path.dirname(sys.executable), "composer"), "-n", "2", "dip_scale/train.py", "yamls/dip_tiny_cpu.yaml",
               f"deepspeed.zero_optimization.stage={stage}", f"trainer.max_duration={steps}ba", "trainer.save_folder=null",
               f"run_dir={run_dir}", "logging.metrics_interval=1ba", f"logging.sample_interval={steps * 10}ba",
               "trainer.progress_bar=false", f"trainer.console_log_interval={steps * 10}ba", *extra]
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak: dict[int, float] = {}
        while proc.poll() is None:
            for rank, pid in _rank_pids(run_dir).items():
                peak[rank] = max(peak.get(rank, 0.0), _hwm_mb(pid))
            time.sleep(0.2)
        if proc.returncode:
            raise RuntimeError(f"ZeRO-{stage} run failed:\n{proc.stderr.read()[-3000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            times = [json.loads(line)["time"] for line in f]
    dts = [b - a for a, b in zip(times, times[1:])][10:]  # skip warm-up
    return {"stage": stage, "step_ms": round(1e3 * statistics.median(dts), 1), "peak_rss_mb": [round(peak.get(r, 0)) for r in (0, 1)]}


def bench_plain(steps: int, per_rank_batch: int) -> float:
    """The same per-rank work in a bare loop: median ms per step."""
    import torch

    from dip_scale.config import load_config
    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.models import build_model

    torch.set_num_threads(1)  # each of the 2 ranks gets one of the 2 cores
    cfg = load_config(os.path.join(ROOT, "yamls", "dip_tiny_cpu.yaml"))
    model = build_model(cfg.model)
    objective = FlowMatchingObjective(cfg.objective, cfg.model.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(per_rank_batch, 3, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    y = torch.zeros(per_rank_batch, dtype=torch.long)
    dts = []
    for i in range(steps):
        start = time.perf_counter()
        loss = objective(model, x, y)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        dts.append(time.perf_counter() - start)
    return 1e3 * statistics.median(dts[10:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--stages", default="1,2,3")
    args, extra = ap.parse_known_args()
    from dip_scale.config import load_config

    cfg = load_config(os.path.join(ROOT, "yamls", "dip_tiny_cpu.yaml"), extra)
    plain = bench_plain(args.steps, cfg.data.batch_size // 2)
    rows = [bench_stage(int(s), args.steps, extra) for s in args.stages.split(",")]
    print(f"tiny preset ({cfg.model.preset} at {cfg.model.image_size}px, global batch {cfg.data.batch_size}), 2 CPU processes, median of {args.steps - 11} steps")
    print(f"{'engine':<22} {'step ms':>8} {'overhead':>9} {'peak RSS rank0 MB':>18} {'rank1 MB':>9}")
    print(f"{'bare PyTorch (1 proc)':<22} {plain:>8.1f} {'':>9} {'':>18} {'':>9}")
    for r in rows:
        print(f"{'ZeRO-' + str(r['stage']):<22} {r['step_ms']:>8.1f} {r['step_ms'] / plain:>8.2f}x {r['peak_rss_mb'][0]:>18} {r['peak_rss_mb'][1]:>9}")
    print(json.dumps({"plain_step_ms": round(plain, 1), "rows": rows}))


if __name__ == "__main__":
    main()
