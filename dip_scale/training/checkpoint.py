"""Resume that never silently restarts, never crash-loops on a damaged checkpoint, and never lets
a planted file run code on the trainers (docs/architecture.md, "Checkpoints and resume").

Writing. After Composer saves a step, every rank hashes its own tar (sha256, and an HMAC-SHA256
over name + bytes when DIP_SCALE_CHECKPOINT_KEY is set) and rank 0 writes the step's manifest
`ep{e}-ba{b}.manifest.json`: the world size and every tar's size, sha256 and tag.

Resuming. Rank 0 lists the save folder once and orders the steps newest first; a step is a
candidate when its manifest lists tars that are all present at their recorded size (a step
without a manifest, from a crash between the tars and the manifest or an older dip_scale, is a
candidate when every rank's tar is there, unless a key is set). Every rank then copies its tar
(and, on a node without global rank 0, rank 0's; Composer issue #2326) into `<run_dir>/resume/`
while hashing it and checks the copy before Composer opens it: size and sha256 as recorded, the
HMAC when a key is set, a tar that reads to its end, and no member that is absolute, climbs out
with `..`, or is a link or a device. A damaged candidate (cut short, wrong size or hash) is
reported by name and the next older one is tried; a forged one (bad or missing tag, unsafe
member) stops every rank before anything is unpickled. A folder that holds checkpoints or
exports this run cannot resume from is an error naming them, unless `trainer.start_over`.
Composer's `latest` pointer is only a hint.

Trust model: without a key the save folder (bucket) is the trust boundary, since Composer
unpickles `composer_states.pt` with a full `torch.load`; with a key, only a holder of the key
can produce a checkpoint the trainers will open.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Optional

from composer.utils import dist, format_name_with_dist

from dip_scale import storage
from dip_scale.naming import EMA_DIR, EVAL_DIR, Step, is_run_artefact, parse_manifest, parse_tar
from dip_scale.training.checkpoint_files import (
    KEY_ENV, CheckpointError, CheckpointRefused, checkpoint_key, fetch, fetch_checked, hash_file,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dip_scale.checkpoint.v1"
_RANK_SHARD = "zero_pp_rank_"


def record_step(state, local_tar: str, folder: str) -> None:
    """On every rank after Composer saved `local_tar` for this step: gather the tars' digests and,
    on rank 0, write the step's manifest into `folder` (local or s3://)."""
    step = Step(batch=state.timestamp.batch.value, epoch=state.timestamp.epoch.value)
    name = os.path.basename(local_tar)
    size, sha, tag = hash_file(local_tar, name, checkpoint_key())
    rows = dist.all_gather_object({"name": name, "size": size, "sha256": sha, "hmac": tag})
    if dist.get_global_rank() != 0:
        return
    manifest = {"format": MANIFEST_FORMAT, "batch": step.batch, "epoch": step.epoch, "world_size": len(rows),
                "authenticated": tag is not None, "tars": {r["name"]: {k: r[k] for k in ("size", "sha256", "hmac")} for r in rows}}
    storage.write_bytes(storage.join(folder, step.manifest), (json.dumps(manifest, indent=1) + "\n").encode())


# --------------------------------------------------------------------------------------------
# Finding the resume point (rank 0)
# --------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    step: Step
    tars: dict[int, str]  # rank -> path in the save folder
    manifest: Optional[dict] = None
    problems: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> Optional[int]:
        return int(self.manifest["world_size"]) if self.manifest else None


@dataclass
class Resume:
    """Where Composer loads from, and how."""

    load_path: str  # a local file name; with {rank} unless universal
    step: Step
    written_by: int  # the data-parallel world size that wrote the checkpoint
    universal: bool = False  # a DeepSpeed universal checkpoint (checkpoint.load_universal)


def _scan(folder: str, world: int, key: Optional[bytes]) -> tuple[list[Candidate], list[Candidate], list[str]]:
    """-> (candidates newest first, steps that are not, every run artefact in the folder)."""
    sizes = storage.list_sizes(folder) if storage.is_s3(folder) or os.path.isdir(folder) else {}
    root = folder.rstrip("/") + "/"
    artefacts = [p for p in sizes if is_run_artefact(p[len(root):])]
    steps: dict[Step, Candidate] = {}
    for path in sizes:
        rel = path[len(root):]
        if "/" in rel:
            continue
        if (parsed := parse_tar(rel)) is not None:
            step, rank = parsed
            steps.setdefault(step, Candidate(step, {})).tars[rank] = path
        elif (step := parse_manifest(rel)) is not None:
            cand = steps.setdefault(step, Candidate(step, {}))
            try:
                cand.manifest = json.loads(storage.read_bytes(path) or b"")
            except ValueError:
                cand.problems.append(f"{path}: not a readable manifest")
    good, bad = [], []
    for step in sorted(steps, reverse=True):
        cand = steps[step]
        m = cand.manifest
        if m is not None and not cand.problems:
            names = {cand.step.tar(r): r for r in range(int(m.get("world_size", 0)))}
            for name, rec in (m.get("tars") or {}).items():
                path = storage.join(folder, name)
                if name not in names:
                    cand.problems.append(f"{path}: not a tar of this step")
                elif path not in sizes:
                    cand.problems.append(f"{path}: missing")
                elif sizes[path] != rec.get("size"):
                    cand.problems.append(f"{path}: {sizes[path]} bytes, the manifest records {rec.get('size')} (cut short?)")
            if key is not None and not m.get("authenticated"):
                cand.problems.append(f"{storage.join(folder, step.manifest)}: written without {KEY_ENV}, so it cannot be authenticated")
        elif m is None:
            if key is not None:
                cand.problems.append(f"no manifest {storage.join(folder, step.manifest)}, so no authentication tags")
            elif sorted(cand.tars) != list(range(world)):
                cand.problems.append(f"tars of ranks {sorted(cand.tars)} present, this run has {world} ranks, and no manifest")
        (bad if cand.problems else good).append(cand)
    return good, bad, artefacts


def _add_rank0_members(rank0_tar: str, mine: str) -> None:
    """Append rank 0's non-shard members (composer_states.pt, mp_rank_00_model_states.pt) that
    ZeRO-1/2 keep only there to this rank's copy, for a node without global rank 0."""
    with tarfile.open(rank0_tar) as src, tarfile.open(mine, "a") as dst:
        have = {x.name.lstrip("/") for x in dst.getmembers()}
        for member in src.getmembers():
            name = member.name.lstrip("/")
            if member.isfile() and name not in have and _RANK_SHARD not in os.path.basename(name):
                dst.addfile(member, src.extractfile(member))


def _outcome(cand: Candidate, statuses: list[tuple[str, str]]) -> bool:
    """Every rank's (status, why) for `cand` -> usable? Forged anywhere: CheckpointRefused."""
    forged = sorted({why for status, why in statuses if status == "forged"})
    if forged:
        raise CheckpointRefused("checkpoint refused:\n  " + "\n  ".join(forged))
    damaged = sorted({why for status, why in statuses if status == "damaged"})
    if damaged:
        log.error("checkpoint %s is damaged and is skipped:\n  %s", cand.step.stem, "\n  ".join(damaged))
    return not damaged


def _try(cand: Candidate, folder: str, local_dir: str, key: Optional[bytes]) -> Optional[Resume]:
    """Every rank fetches and checks its part of `cand` -> how to load it, or None when some rank
    found it damaged (reported). Forged: CheckpointRefused on every rank."""
    os.makedirs(local_dir, exist_ok=True)
    world = dist.get_world_size()
    if cand.world_size is not None and cand.world_size != world:
        return _try_universal(cand, folder, local_dir, key)
    rank, local_rank = dist.get_global_rank(), dist.get_local_rank()
    results = [fetch(cand, rank, local_dir, key)]
    needs_rank0 = local_rank == 0 and rank != 0  # the first rank of a node without global rank 0
    if needs_rank0:
        results.append(fetch(cand, 0, local_dir, key))
    if not _outcome(cand, [r for per_rank in dist.all_gather_object(results) for r in per_rank]):
        return None
    if needs_rank0:
        _add_rank0_members(results[1][1], results[0][1])
        os.remove(results[1][1])
    return Resume(os.path.join(local_dir, cand.step.tar("{rank}")), cand.step, written_by=cand.world_size or world)


def _try_universal(cand: Candidate, folder: str, local_dir: str, key: Optional[bytes]) -> Optional[Resume]:
    """A checkpoint of another world size: its DeepSpeed universal form (training/elastic.py),
    converted once by rank 0 and cached beside it, fetched and checked by every node."""
    from dip_scale.training.elastic import ensure_universal

    status = [ensure_universal(cand, folder, local_dir, key) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(status, src=0)
    if not _outcome(cand, [status[0][:2]]):
        return None
    name, rec = status[0][1], status[0][2]
    fetched = ("ok", os.path.join(local_dir, name))
    if dist.get_local_rank() == 0 and dist.get_global_rank() != 0:  # rank 0 made it here; other nodes fetch it
        fetched = fetch_checked(storage.join(folder, name), name, rec, local_dir, key)
    if not _outcome(cand, dist.all_gather_object(fetched)):
        return None
    dist.barrier()  # every node's copy is in place before any rank reads it
    log.info("elastic resume: %s was written by %d ranks, this run has %d; loading its universal form %s",
             cand.step.stem, cand.world_size, dist.get_world_size(), storage.join(folder, name))
    return Resume(os.path.join(local_dir, name), cand.step, written_by=cand.world_size, universal=True)


def _describe(artefacts: list[str]) -> str:
    """'checkpoints of steps 30, 20, 10 (ep3-ba30-rank0.tar, ...), 3 EMA exports, 1 eval result'."""
    steps = sorted({p[0].batch for a in artefacts if (p := parse_tar(a.rsplit("/", 1)[-1]))}, reverse=True)
    tars = sorted((a.rsplit("/", 1)[-1] for a in artefacts if parse_tar(a.rsplit("/", 1)[-1])),
                  key=lambda n: -parse_tar(n)[0].batch)
    parts = [f"checkpoints of steps {', '.join(map(str, steps))} ({tars[0]}, ...)"] if steps else []
    for kind, label in ((f"/{EMA_DIR}/", "EMA export(s)"), (f"/{EVAL_DIR}/", "eval file(s)")):
        n = sum(kind in a for a in artefacts)
        if n:
            parts.append(f"{n} {label}")
    return ", ".join(parts) or f"{len(artefacts)} file(s)"


def resolve_resume(save_folder: Optional[str], run_name: str, local_dir: str, *, resume: bool = True, start_over: bool = False) -> Optional[Resume]:
    """On every rank, before the Trainer is built: how to load a checked copy of the newest
    usable checkpoint (at another world size: its universal form), or None for a fresh start. `resume=False` never resumes.
    Raises CheckpointError when the folder holds run artefacts this run would neither resume from
    nor be allowed to replace; `start_over` deletes them instead (and never resumes)."""
    if not save_folder:
        return None
    folder = format_name_with_dist(save_folder, run_name)
    key = checkpoint_key()
    world = dist.get_world_size()
    found = [_scan(folder, world, key) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    good, bad, artefacts = found[0]
    if start_over:
        if artefacts and dist.get_global_rank() == 0:
            log.warning("trainer.start_over: deleting %d files of the earlier run in %s", len(artefacts), folder)
            for path in artefacts:
                storage.remove(path)
        dist.barrier()
        return None
    for cand in good if resume else []:
        load_path = _try(cand, folder, local_dir, key)
        if load_path is not None:
            newer = [c for c in bad if c.step > cand.step]
            for c in newer:
                log.warning("checkpoint %s cannot be resumed from: %s", c.step.stem, "; ".join(c.problems))
            if newer or cand is not good[0]:
                log.warning("resuming from %s, the newest checkpoint of %s that can be used", cand.step.stem, folder)
            log.info("resuming from %s (checked copy in %s)", storage.join(folder, cand.step.tar("{rank}")), local_dir)
            return load_path
    if artefacts:
        reasons = "; ".join(f"{c.step.stem}: {', '.join(c.problems)}" for c in bad[:3])
        raise CheckpointError(
            f"{folder} holds {_describe(artefacts)} of an earlier run that this run cannot resume from"
            + (f" ({reasons})" if reasons else "") + ("; trainer.autoresume is false" if not resume else "")
            + ". Nothing was changed. To discard them and start from step 0: trainer.start_over=true; "
            "to keep them: another trainer.save_folder or run_name")
    return None
