"""`python tools/fid_curve.py ...` is `dip-fid-curve ...` (dip_scale/cli/fid_curve.py; `--help`)."""
from dip_scale.cli.fid_curve import main

if __name__ == "__main__":
    raise SystemExit(main())
