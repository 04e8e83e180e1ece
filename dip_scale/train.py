"""Train DiP: `composer -n 8 dip_scale/train.py CONFIG.yaml [key.path=value ...]`.

Thin on purpose: load and validate the config (seconds, before any heavy import), then hand
over to dip_scale.training.run, which builds model, data, optimiser and callbacks and calls
composer.Trainer.fit(). Works under `composer -n N` and as plain `python dip_scale/train.py`.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dip_scale.config import ConfigError, load_config_or_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config_or_exit(sys.argv[1:] if argv is None else argv, "usage: dip_scale/train.py CONFIG.yaml [key.path=value ...]", check_files=True)
    except SystemExit as e:
        return int(e.code)
    import logging

    from dip_scale.training.callbacks import NonFiniteLossError
    from dip_scale.training.run import train  # heavy imports only after the config is known good

    rank = os.environ.get("RANK", "0")
    # S3 hiccups (checkpoint uploads, resume downloads) are retried with backoff for about a minute
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "20")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("composer", "streaming", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        train(cfg)
    except ConfigError as e:
        print(f"dip_scale: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"dip_scale (rank {rank}): {e}", file=sys.stderr)
        return 3
    return 0


# The guard matters: Composer's remote uploader spawns processes that re-import this file.
if __name__ == "__main__":
    sys.exit(main())
