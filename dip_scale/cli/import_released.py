"""`dip-import-released CKPT CONFIG.yaml [key.path=value ...] --out MODEL.safetensors [--weights ema|online]`:
a released DiP checkpoint as a dip_scale model file (dip_scale/models/released.py says how)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from dip_scale.models import released


def main(argv: Optional[list[str]] = None) -> int:
    from dip_scale.models.spec import load_model_config
    from dip_scale.schema import ConfigError

    ap = argparse.ArgumentParser(description=released.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="released checkpoint: .ckpt / .pt / .pth / .safetensors, local or s3://")
    ap.add_argument("config", help="experiment YAML whose model: section describes the checkpoint (e.g. yamls/dip_xl16_600ep.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides of the config (e.g. model.depth=28)")
    ap.add_argument("--out", required=True, help="model file to write (local or s3://)")
    ap.add_argument("--weights", default="ema", choices=sorted(released.WEIGHT_SETS),
                    help="ema (default: what the paper samples from) or online")
    args = ap.parse_intermixed_args(argv)  # overrides may follow --out
    try:
        model_cfg = load_model_config(args.config, args.overrides)
        summary = released.import_checkpoint(args.ckpt, model_cfg, args.out, args.weights, say=lambda m: print(m, file=sys.stderr))
    except (ConfigError, released.ReleasedCheckpointError, FileNotFoundError) as e:
        print(f"import_released_checkpoint: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
