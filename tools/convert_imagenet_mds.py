"""`python tools/convert_imagenet_mds.py ...` is `dip-convert ...` (dip_scale/cli/convert.py; `--help`)."""
from dip_scale.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
