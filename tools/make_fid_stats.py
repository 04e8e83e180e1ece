"""`python tools/make_fid_stats.py ...` is `dip-fid-stats ...` (dip_scale/cli/fid_stats.py; `--help`)."""
from dip_scale.cli.fid_stats import main

if __name__ == "__main__":
    raise SystemExit(main())
