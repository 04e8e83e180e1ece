"""`python tools/make_standin_inception.py ...` is `dip-standin-inception ...` (dip_scale/eval/standin_inception.py; `--help`)."""
from dip_scale.eval.standin_inception import main

if __name__ == "__main__":
    raise SystemExit(main())
