"""`python tools/sample.py ...` is `dip-sample ...` (dip_scale/cli/sample.py; `--help`)."""
from dip_scale.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
