"""Resume at another data-parallel world size (16 GPUs -> 8 after losing a node, and back)
through DeepSpeed's universal checkpoints (docs/architecture.md, "Elastic resume").

A step written by N ranks is converted once, by rank 0, with DeepSpeed's own
`deepspeed.checkpoint.ds_to_universal`: every rank's tar is fetched and checked as for any
resume, the N tars are merged into one DeepSpeed checkpoint folder and turned into its universal
form (per parameter: fp32 master weight, Adam moments, step), which any world size and ZeRO
stage loads with `checkpoint.load_universal`. The result is one tar (Composer's
`composer_states.pt` + the universal folder) cached beside the checkpoint as
`ep{e}-ba{b}-universal.tar` with its record `ep{e}-ba{b}.universal.json` (size, sha256, HMAC,
and the sha256 of the manifest it was made from), so a second resume reuses it.

Carried over as they are, world-size independent: weights, optimizer moments, fp32 masters (in
the universal form), the EMA (our callback keeps the full EMA in its state and every rank
takes its own slice), schedule and step counter (Composer's state) and the data position
(streaming's state: global sample offset, `num_canonical_nodes` and shuffle seed, so with the
same global batch the samples after the resume are the uninterrupted run's). Not carried: the
per-rank RNG streams (Composer restores those it has ranks for); the diffusion noise does not
use them (flow.py draws it per sample from the run seed, step and sample id).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tarfile
from typing import Optional

from dip_scale import storage

log = logging.getLogger(__name__)


def _manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def ensure_universal(cand, folder: str, local_dir: str, key: Optional[bytes]) -> tuple[str, str, Optional[dict]]:
    """Rank 0: the universal form of `cand` in local_dir and in `folder` (made now, or a valid
    cached one) -> ("ok", tar name, record) | ("damaged" | "forged", why, None)."""
    from dip_scale.training.checkpoint_files import fetch, fetch_checked, hash_file

    tar_name, record_name = cand.step.universal
    source = _manifest_digest(cand.manifest)
    cached = storage.read_bytes(storage.join(folder, record_name))
    if cached:
        rec = json.loads(cached)
        if rec.get("source_manifest_sha256") == source:
            status, where = fetch_checked(storage.join(folder, tar_name), tar_name, rec, local_dir, key)
            if status == "ok":
                log.info("elastic resume: using the universal form of %s cached at %s", cand.step.stem, storage.join(folder, tar_name))
                return "ok", tar_name, rec
            if status == "forged":
                return status, where, None
            log.warning("elastic resume: the cached universal form is unusable (%s); converting again", where)

    work = os.path.join(local_dir, f"convert-{cand.step.stem}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        merged = os.path.join(work, "merged")
        for rank in range(cand.world_size):
            status, where = fetch(cand, rank, work, key)
            if status != "ok":
                return status, where, None
            with tarfile.open(where) as t:  # members checked by _fetch: nothing leaves `merged`
                t.extractall(merged)
            os.remove(where)
        universal = os.path.join(work, "universal")
        _ds_to_universal(os.path.join(merged, "deepspeed"), os.path.join(universal, "deepspeed"))
        shutil.copy(os.path.join(merged, "composer_states.pt"), universal)
        local = os.path.join(local_dir, tar_name)
        with tarfile.open(local + ".part", "w") as t:
            t.add(universal, arcname="")
        os.replace(local + ".part", local)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size, sha, tag = hash_file(local, tar_name, key)
    rec = {"format": "dip_scale.universal.v1", "written_by": cand.world_size, "source_manifest_sha256": source,
           "size": size, "sha256": sha, "hmac": tag}
    storage.upload_file(local, storage.join(folder, tar_name))
    storage.write_bytes(storage.join(folder, record_name), (json.dumps(rec, indent=1) + "\n").encode())
    log.info("elastic resume: converted %s (%d ranks) to its universal form, %.1f MB, cached at %s",
             cand.step.stem, cand.world_size, size / 1e6, storage.join(folder, tar_name))
    return "ok", tar_name, rec


def _ds_to_universal(src: str, dst: str) -> None:
    """DeepSpeed's own converter, in this process (one worker: no forks next to a process group)."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                                            keep_temp_folder=False, strict=True, inject_missing_state=True))
