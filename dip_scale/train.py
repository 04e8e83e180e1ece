"""Train DiP: `composer -n 8 dip_scale/train.py CONFIG.yaml [key.path=value ...]`.

Thin on purpose: load and validate the config (seconds, before any heavy import), check that the
object storage it names answers, then hand over to dip_scale.training.run (validate -> build ->
fit -> report). Works under `composer -n N`, as `python dip_scale/train.py` and as
`python -m dip_scale.train`. Exit codes, the same on every rank (docker/k8s/base/train-job.yaml's
podFailurePolicy relies on them): 0 done (also: already complete), 2 config or input error
(also a damaged data shard, named),
3 non-finite loss, 4 object storage unreachable, 5 checkpoint refused (authentication / unsafe
members).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dip_scale.config import ConfigError, load_config_or_exit, s3_locations  # noqa: E402

EXIT_CONFIG, EXIT_NONFINITE, EXIT_STORAGE, EXIT_REFUSED = 2, 3, 4, 5
USAGE = """usage: composer -n GPUS [-m] dip_scale/train.py CONFIG.yaml [key.path=value ...]
       composer -n GPUS -m dip_scale.train CONFIG.yaml [...]    python dip_scale/train.py CONFIG.yaml [...]    dip-train ...
Train DiP: Composer's Trainer over DeepSpeed ZeRO, resuming from trainer.save_folder when it holds
this run's checkpoints. Exit codes: 0 done (or already complete), 2 config or input error,
3 non-finite loss, 4 object storage unreachable, 5 checkpoint refused."""
TERM_GRACE_S = 5.0


def _graceful_sigterm() -> None:
    """The launcher SIGTERMs the other ranks as soon as one exits non-zero, and reports the exit
    code of the lowest rank that failed. The errors above are collective (every rank meets them
    within milliseconds), so a rank that is told to stop gets a short grace to exit with its own
    code instead of -15; otherwise it leaves with 128 + SIGTERM."""
    import signal
    import threading

    def on_term(signum, frame):
        threading.Timer(TERM_GRACE_S, lambda: os._exit(128 + signum)).start()

    signal.signal(signal.SIGTERM, on_term)


def main(argv: list[str] | None = None) -> int:
    _graceful_sigterm()  # first: a config error is met by every rank, the slowest must still report it
    try:
        cfg = load_config_or_exit(sys.argv[1:] if argv is None else argv, USAGE, check_files=True)
    except SystemExit as e:
        return int(e.code)
    from dip_scale import storage

    rank = os.environ.get("RANK", "0")
    try:
        for key, url in s3_locations(cfg):
            storage.check_reachable(url, key)
    except storage.StorageUnreachable as e:
        print(f"dip_scale (rank {rank}): {e}", file=sys.stderr)
        return EXIT_STORAGE
    if not cfg.model.compile:
        # DeepSpeed's ZeRO optimizer check imports its Muon kernels, whose torch.compile decorator
        # pre-starts inductor's compile-worker process on every rank (a process that imports torch,
        # ~7 s of CPU); a run that compiles nothing never uses it
        os.environ.setdefault("TORCH_WARM_POOL", "0")
    import logging

    from dip_scale.data.streaming import ShardError
    from dip_scale.training.callbacks import NonFiniteLossError
    from dip_scale.training.checkpoint import CheckpointError, CheckpointRefused
    from dip_scale.training.run import train  # heavy imports only after the config is known good

    # S3 hiccups during the run (checkpoint uploads, resume downloads) are retried with backoff
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "20")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("composer", "streaming", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # what stops a run, and the exit code each means (first match wins: subclasses first)
    stops = ((NonFiniteLossError, EXIT_NONFINITE), (CheckpointRefused, EXIT_REFUSED), (storage.StorageUnreachable, EXIT_STORAGE),
             (ConfigError, EXIT_CONFIG), (ShardError, EXIT_CONFIG), (CheckpointError, EXIT_CONFIG))
    try:
        train(cfg)
    except tuple(cls for cls, _ in stops) as e:  # a damaged shard, a refused checkpoint, ...: named, no traceback
        print(f"dip_scale (rank {rank}): {e}", file=sys.stderr)
        return next(code for cls, code in stops if isinstance(e, cls))
    return 0


def run_as_script() -> None:
    """A failing rank leaves at once with its code: the launcher SIGTERMs the others the moment
    one exits, and a rank still tearing down the interpreter would report -15 instead."""
    rc = main()
    if rc:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(0)


# The guard matters: Composer's remote uploader spawns processes that re-import this file.
if __name__ == "__main__":
    run_as_script()
