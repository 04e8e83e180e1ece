"""Time dip-import-released (dip_scale/models/released.py) on a full-size released-format checkpoint.

    python tools/bench_import.py [CONFIG.yaml [model.key=value ...]]   # default: the paper's DiP-XL/16

Writes a Lightning-style `.ckpt` with random `denoiser.*` + `ema_denoiser.*` tensors (the names
and shapes the configured model's released counterpart has) and a REPA projector to a temporary
folder, imports it, and prints one table: checkpoint size, save time, import time, peak RSS.
Last line: one JSON object. XL/16 needs ~5 GB of disk and ~8 GB of memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time

import torch

from dip_scale.models.spec import load_model_config
from dip_scale.models import build_model
from dip_scale.models.released import released_rules, import_checkpoint


def released_layout(model_cfg) -> dict[str, tuple]:
    """Released name -> shape for the configured model, from the importer's own mapping rules
    (the split SwiGLU input halves its rows)."""
    with torch.device("meta"):
        ours = build_model(model_cfg).state_dict()
    rules = [(re.compile(p), f) for p, f in released_rules(len(model_cfg.head.channels))]
    out = {}
    for name, t in ours.items():
        sources = next(f(m) for p, f in rules if (m := p.fullmatch(name)))
        shape = tuple(t.shape)
        for src in sources:
            out[src] = (shape[0] // len(sources), *shape[1:])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "yamls", "dip_xl16_600ep.yaml"))
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides of the config's model section")
    args = ap.parse_args(argv)
    model_cfg = load_model_config(args.config, args.overrides)
    layout = released_layout(model_cfg)
    d = model_cfg.trunk().hidden_size
    g = torch.Generator().manual_seed(0)
    sd = {}
    for prefix in ("denoiser.", "ema_denoiser."):
        sd.update({prefix + k: torch.randn(s, generator=g) * 0.02 for k, s in layout.items()})
    for i, (a, b) in enumerate(((d, d), (d, d), (768, d))):
        sd[f"diffusion_trainer.proj.0.{2 * i}.weight"] = torch.randn(a, b, generator=g) * 0.02
        sd[f"diffusion_trainer.proj.0.{2 * i}.bias"] = torch.zeros(a)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "last.ckpt")
        t0 = time.perf_counter()
        torch.save({"epoch": 1, "global_step": 1, "state_dict": sd}, ckpt)
        save_s = time.perf_counter() - t0
        size = os.path.getsize(ckpt)
        del sd
        t0 = time.perf_counter()
        summary = import_checkpoint(ckpt, model_cfg, os.path.join(tmp, "model.safetensors"), say=lambda m: print(m, file=sys.stderr))
        import_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"preset": model_cfg.preset, "image_size": model_cfg.image_size, "parameters": summary["parameters"],
           "checkpoint_gib": round(size / 2**30, 2), "save_s": round(save_s, 1), "import_s": round(import_s, 1),
           "peak_rss_gib": round(rss, 2), "cpus": os.cpu_count()}
    print(f"{'model':<10} {'params':>12} {'ckpt GiB':>9} {'import s':>9} {'peak RSS GiB':>13}")
    print(f"{row['preset']:<10} {row['parameters']:>12,} {row['checkpoint_gib']:>9} {row['import_s']:>9} {row['peak_rss_gib']:>13}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
