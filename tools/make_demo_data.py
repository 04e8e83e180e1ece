"""`python tools/make_demo_data.py ...` is `dip-demo-data ...` (dip_scale/data/demo_tree.py; `--help`)."""
from dip_scale.data.demo_tree import main

if __name__ == "__main__":
    raise SystemExit(main())
