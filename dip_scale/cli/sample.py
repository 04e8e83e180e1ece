"""Sample a grid from an exported model file (EMA safetensors written at every checkpoint).

    dip-sample s3://bkt/runs/dip-xl16/checkpoints/ema/ep100-ba500400.safetensors \
        --classes 207,360 --per-class 4 --out grid.png [--steps 100 --cfg-scale 2.9 --method euler]

Needs neither DeepSpeed nor the experiment YAML: the architecture is stored in the file. Sampler
defaults are the paper's (Euler, 100 steps, CFG 2.9 on t in [0.03, 0.89], t = 1 is noise).
"""
from __future__ import annotations

import argparse
import sys

import torch

from dip_scale.config import SamplerConfig, spread_classes


def main(argv=None) -> int:
    d = SamplerConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_file", help="local path or s3:// URL of a dip_scale model file (.safetensors)")
    ap.add_argument("--classes", default=None, help="comma-separated class ids (default: 8 spread over the label range)")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--method", default=d.method, choices=["euler", "heun"])
    ap.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    ap.add_argument("--cfg-interval", default=",".join(map(str, d.cfg_interval)), help="low,high in t (t = 1 is noise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="samples.png")
    args = ap.parse_args(argv)

    from dip_scale.diffusion.sampler import sample
    from dip_scale.models.export import read_model_file
    from dip_scale.visual import image_grid, save_png

    try:
        model, model_cfg, meta = read_model_file(args.model_file)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample: {e}", file=sys.stderr)
        return 2
    k = model_cfg.num_classes
    classes = [int(c) for c in args.classes.split(",")] if args.classes else spread_classes(k)
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        print(f"sample: --classes {bad} outside 0..{k - 1} of this model", file=sys.stderr)
        return 2
    labels = [c for c in classes for _ in range(args.per_class)]
    lo, hi = (float(x) for x in args.cfg_interval.split(","))
    model = model.to(args.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        images = sample(model, torch.tensor(labels, device=args.device), [args.seed + i for i in range(len(labels))],
                        image_size=model_cfg.image_size, null_class=k, steps=args.steps, method=args.method,
                        cfg_scale=args.cfg_scale, cfg_interval=(lo, hi), progress=True)
    grid = image_grid(images.cpu(), titles=[str(c) for c in labels], ncol=args.per_class if args.per_class > 1 else None)
    print(save_png(grid, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
