"""`python tools/model_summary.py ...` is `dip-summary ...` (dip_scale/cli/summary.py; `--help`)."""
from dip_scale.cli.summary import main

if __name__ == "__main__":
    raise SystemExit(main())
