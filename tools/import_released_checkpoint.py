"""Import a released DiP checkpoint as a dip_scale model file (see dip_scale/models/released.py).

    python tools/import_released_checkpoint.py CKPT CONFIG.yaml [key.path=value ...] --out MODEL.safetensors [--weights ema|online]
"""
import sys

from dip_scale.models.released import main

if __name__ == "__main__":
    sys.exit(main())
