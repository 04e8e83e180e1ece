"""`python tools/import_released_checkpoint.py ...` is `dip-import-released ...` (dip_scale/cli/import_released.py; `--help`)."""
from dip_scale.cli.import_released import main

if __name__ == "__main__":
    raise SystemExit(main())
