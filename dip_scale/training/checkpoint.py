"""Checkpoint names and exact, multi-node-safe resume for Composer 0.27 + DeepSpeed.

Composer's own autoresume under DeepSpeed has three flaws we route around (DESIGN §3):
  * Each rank downloads only its own tar, but under ZeRO-1/2 `mp_rank_00_model_states.pt` and
    Composer's `composer_states.pt` exist only in rank 0's tar: nodes without global rank 0
    cannot resume (composer issue #2326).
  * Each rank follows its own "latest" pointer; pointers are published independently, so a
    job killed between two publications silently mixes steps.
  * A mid-epoch resume with a resumable (streaming) dataset does not restore the RNG, so the
    diffusion noise and times diverge from the uninterrupted run.
`resolve_resume` picks the step from rank 0's pointer only, fetches this rank's tar and, on a
node without global rank 0, appends rank 0's non-shard members to it; `RestoreRNG` puts the
checkpointed RNG back before the first resumed batch. The resulting `load_path` goes to the
Trainer with `autoresume=False`.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, reproducibility

from dip_scale import storage

log = logging.getLogger(__name__)

SAVE_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.tar"  # plain .tar: DeepSpeed's *.pt.tar breaks autoresume
LATEST_FILENAME = "latest-rank{rank}.tar"
_RANK_SHARD = re.compile(r"zero_pp_rank_\d+_")
_STEP = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.tar$")


def _readable_tar(path: str) -> bool:
    """A tar whose every header reads back: a checkpoint cut off mid-write is not."""
    try:
        with tarfile.open(path) as t:
            return bool(t.getmembers())
    except (tarfile.TarError, OSError, EOFError):
        return False


def _rank0_checkpoint_name(folder: str, run_name: str) -> Optional[str]:
    """The file name rank 0's latest pointer names, or None for a fresh run."""
    latest0 = format_name_with_dist(LATEST_FILENAME.replace("{rank}", "0"), run_name)
    if storage.is_s3(folder):
        # Composer publishes `<latest>.symlink` (an object holding the target's key) only once
        # every rank's tar of that step exists on S3, so it never names an incomplete upload
        data = storage.read_bytes(storage.join(folder, latest0 + ".symlink"))
        return os.path.basename(data.decode().strip()) if data else None
    link = os.path.join(folder, latest0)
    if os.path.lexists(link):
        return os.path.basename(os.readlink(link))
    # the local pointer is replaced by remove + symlink; if killed in between, take the newest
    # step whose tars all read back completely
    steps = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = _STEP.match(name)
        if m:
            steps.setdefault((int(m[1]), int(m[2])), []).append(os.path.join(folder, name))
    world = dist.get_world_size()
    for (epoch, batch), files in sorted(steps.items(), reverse=True):
        if len(files) == world and all(_readable_tar(f) for f in files):
            return SAVE_FILENAME.format(epoch=epoch, batch=batch, rank=0)
    return None


def resolve_resume(save_folder: Optional[str], run_name: str, local_dir: str) -> Optional[str]:
    """On every rank, before the Trainer is built: the `load_path` (a format string with {rank})
    of the last complete checkpoint, or None when there is none (a fresh run)."""
    if not save_folder:
        return None
    folder = format_name_with_dist(save_folder, run_name)
    rank0_name = _rank0_checkpoint_name(folder, run_name)
    if rank0_name is None:
        return None
    m = _STEP.match(rank0_name)
    if m is None:
        raise RuntimeError(f"{folder}: the latest checkpoint {rank0_name!r} does not follow {SAVE_FILENAME!r}")
    template = SAVE_FILENAME.format(epoch=int(m[1]), batch=int(m[2]), rank="{rank}")
    rank, local_rank = dist.get_global_rank(), dist.get_local_rank()
    mine = template.format(rank=rank)
    needs_rank0_members = local_rank == 0 and rank != 0  # the first rank of a node without global rank 0
    if not storage.is_s3(folder) and not needs_rank0_members:
        if not os.path.exists(os.path.join(folder, mine)):
            raise FileNotFoundError(f"rank {rank}: {mine} is missing in {folder}; cannot resume from {rank0_name}")
        log.info("resuming from %s", os.path.join(folder, template))
        return os.path.join(folder, template)

    os.makedirs(local_dir, exist_ok=True)
    part = os.path.join(local_dir, mine + ".part")
    storage.download_file(storage.join(folder, mine), part)
    if needs_rank0_members:
        rank0_copy = os.path.join(local_dir, rank0_name + ".rank0")
        storage.download_file(storage.join(folder, rank0_name), rank0_copy)
        with tarfile.open(rank0_copy) as src, tarfile.open(part, "a") as dst:
            have = {x.name.lstrip("/") for x in dst.getmembers()}
            for member in src.getmembers():
                name = member.name.lstrip("/")
                if member.isfile() and name not in have and not _RANK_SHARD.search(os.path.basename(name)):
                    dst.addfile(member, src.extractfile(member))  # composer_states.pt, mp_rank_00_model_states.pt
        os.remove(rank0_copy)
    os.replace(part, os.path.join(local_dir, mine))
    log.info("resuming from %s (fetched to %s)", storage.join(folder, template), local_dir)
    return os.path.join(local_dir, template)


class RestoreRNG(Callback):
    """Composer 0.27 restores the checkpointed per-rank RNG only at an epoch boundary or while
    spinning a non-resumable loader; a mid-epoch resume of a StreamingDataset continues from a
    fresh seed instead. This puts it back just before the first resumed batch is fetched."""

    def __init__(self):
        self._rng = None

    def take_over(self, trainer) -> None:
        """Call right after building the Trainer (reads Composer 0.27's `_rng_state`)."""
        state = trainer.state
        if getattr(trainer, "_rng_state", None) is not None and state.dataset_resumption.get("train") and int(state.timestamp.batch_in_epoch) > 0:
            self._rng, trainer._rng_state = trainer._rng_state, None

    def before_dataloader(self, state: State, logger: Logger) -> None:
        if self._rng is not None:
            reproducibility.load_rng_state(self._rng)
            self._rng = None
