"""The run's artefacts survive the pod: <run_dir>'s metrics.jsonl, samples/ba<step>.png,
fid.jsonl, fid.png and config.yaml are mirrored to `logging.run_upload` (by default
<save_folder>/../run for an s3:// save folder) as they are written, and a run that resumes on an
empty disk continues them from there (docs/operations.md).

Layout of the mirror (local folder or s3://):

    config.yaml  fid.jsonl  fid.png        copies, uploaded again when they change
    samples/ba<step>.png                   one object per grid, uploaded once
    metrics/<after>.jsonl                  metrics.jsonl in parts: part <after> holds the lines
                                           after checkpoint step <after> (12 digits, 0 = the start)

metrics.jsonl grows for the whole run; S3 has no append, so it is kept in parts that are sealed
at every checkpoint: only the open part (the lines since the last checkpoint) is uploaded again,
every `logging.run_upload_interval` seconds. Ordering makes a resume exact: the saver's hook
(training/run.py) seals the open part and waits for every pending upload *before* the step's
manifest is written, so whatever checkpoint a run resumes from, the mirror holds every line and
grid up to its step. On resume from step R (rank 0, before the Trainer is built): lines and
grids after R belong to a discarded future and are dropped here and in the mirror (as
MetricsJSONL does locally), the rest is restored into an empty run_dir; the parts are merged by
step, so a part left over by a kill at any point never duplicates a line.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale import naming, storage
from dip_scale.config import ConfigError

log = logging.getLogger(__name__)

METRICS = naming.RUN_METRICS
COPIES = (naming.RUN_CONFIG, naming.RUN_EVALS, naming.RUN_EVAL_PLOT)  # whole files, uploaded again when they change
RESULTS = (naming.RUN_EVALS, naming.RUN_EVAL_PLOT)


def merge_parts(parts: dict[int, bytes]) -> list[dict]:
    """The rows of the parts in step order, each step once: parts are read in order of the
    checkpoint they follow and a row is kept only if its step is past the last one kept."""
    rows, last = [], 0
    for after in sorted(parts):
        for line in parts[after].decode().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-upload cannot happen (one PUT), but be lenient
                continue
            if row.get("step", 0) > last:
                rows.append(row)
                last = row["step"]
    return rows


def _under(rel: str, folder: str, parse) -> Optional[int]:
    """parse(name) of a path `folder/name`, None for a path elsewhere."""
    head, _, name = rel.partition("/")
    return parse(name) if head == folder else None


class RunMirror(Callback):
    """Rank 0 (global): keeps `remote` a copy of run_dir's artefacts. Build it on every rank (it
    is inert elsewhere); call `restore` before the Trainer is built, and `checkpoint` from the
    checkpoint saver's hook before the manifest is written."""

    def __init__(self, run_dir: str, remote: str, run_name: str, interval_s: float = 30.0):
        self.run_dir, self.remote, self.run_name, self.interval_s = run_dir, remote.rstrip("/"), run_name, interval_s
        self.active = dist.get_global_rank() == 0
        self._synced: dict[str, tuple[int, int]] = {}  # relative path -> (mtime_ns, size) last uploaded
        self._part_after = 0  # the open part follows this checkpoint step
        self._part_offset = 0  # where it begins in the local metrics.jsonl
        self._part_sent = -1  # bytes of the open part last uploaded
        self._last_sync = 0.0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: list[tuple[str, concurrent.futures.Future]] = []

    # ---------------------------------------------------------------- restore (before the Trainer)
    def _remote(self, rel: str) -> str:
        return storage.join(self.remote, rel)

    def _local(self, rel: str) -> str:
        return os.path.join(self.run_dir, rel)

    def restore(self, resume_step: int) -> None:
        """Every rank (the check is collective): refuse a mirror of another run; on rank 0 make
        run_dir and the mirror agree on everything up to `resume_step` and drop what is after it."""
        problem = [self._other_run() if self.active else None]
        dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise ConfigError(problem[0])
        if not self.active:
            return
        keys = {k[len(self.remote) + 1:]: k for k in storage.list_keys(self.remote)}
        self._restore_metrics(keys, resume_step)
        self._restore_grids(keys, resume_step)
        for rel in RESULTS:
            if rel in keys and resume_step == 0:  # a fresh start: the results of a discarded run
                storage.remove(keys[rel])
            elif rel in keys and not os.path.exists(self._local(rel)):
                storage.download_file(keys[rel], self._local(rel))
                self._mark(rel)
        self._part_after, self._part_offset = resume_step, self._metrics_end()  # (fit_start sets them again)
        log.info("run files mirrored to %s (restored up to step %d)", self.remote, resume_step)

    def _other_run(self) -> Optional[str]:
        data = storage.read_bytes(self._remote(naming.RUN_CONFIG))
        if not data:
            return None
        import yaml

        other = (yaml.safe_load(data) or {}).get("run_name")
        if other is not None and other != self.run_name:
            return (f"logging.run_upload: {self.remote} holds the files of run {other!r}, not {self.run_name!r}; "
                    "set logging.run_upload to a folder of this run's own")
        return None

    def _restore_metrics(self, keys: dict[str, str], resume_step: int) -> None:
        parts = {after: rel for rel in keys if (after := _under(rel, naming.METRICS_PARTS_DIR, naming.parse_metrics_part)) is not None}
        kept = {after: storage.read_bytes(keys[rel]) or b"" for after, rel in parts.items() if after < resume_step}
        remote_rows = [r for r in merge_parts(kept) if r["step"] <= resume_step]
        path = self._local(METRICS)
        local_rows = []
        if os.path.exists(path):
            with open(path, "rb") as f:
                local_rows = [r for r in merge_parts({0: f.read()}) if r["step"] <= resume_step]
        rows = local_rows if local_rows and local_rows[-1]["step"] >= (remote_rows[-1]["step"] if remote_rows else 0) else remote_rows
        os.makedirs(self.run_dir, exist_ok=True)
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        storage.write_bytes(path, data)
        if [r["step"] for r in rows] != [r["step"] for r in remote_rows]:  # the mirror lacks some: one part holds them all
            storage.write_bytes(self._remote(naming.metrics_part(0)), data)
            stale = [after for after in parts if 0 < after < resume_step]
        else:
            stale = []
        for after in stale + [a for a in parts if a >= resume_step]:
            storage.remove(keys[parts[after]])

    def _restore_grids(self, keys: dict[str, str], resume_step: int) -> None:
        folder = self._local(naming.SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            step = naming.parse_grid(name)
            if step is not None and step > resume_step:
                os.remove(os.path.join(folder, name))
        for rel, key in keys.items():
            step = _under(rel, naming.SAMPLES_DIR, naming.parse_grid)
            if step is None:
                continue
            if step > resume_step:
                storage.remove(key)
                continue
            if not os.path.exists(self._local(rel)):
                storage.download_file(key, self._local(rel))
            self._mark(rel)

    def _mark(self, rel: str) -> None:
        st = os.stat(self._local(rel))
        self._synced[rel] = (st.st_mtime_ns, st.st_size)

    # ---------------------------------------------------------------- mirroring (rank 0)
    def fit_start(self, state: State, logger: Logger) -> None:
        if not self.active:
            return
        path = self._local(METRICS)  # after MetricsJSONL cut it back to the resume step
        self._part_after = state.timestamp.batch.value
        self._part_offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.sync(wait=False)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.active and time.time() - self._last_sync >= self.interval_s:
            self.sync(wait=False)

    def checkpoint(self, state: State) -> None:
        """From the checkpoint saver's hook, before the step's manifest: everything up to this
        step is in the mirror when this returns; the next lines start a new part."""
        if not self.active:
            return
        if self.sync(wait=True):  # else the part stays open: the next sync uploads it again, whole
            self._part_after = state.timestamp.batch.value
            self._part_offset, self._part_sent = self._metrics_end(), -1

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.active:
            self.sync(wait=True)

    def close(self, state: State, logger: Logger) -> None:
        self.finish()

    def finish(self) -> None:
        """Upload what is left and wait for it (also after the end of training: late eval results)."""
        if self.active:
            self.sync(wait=True)

    def _metrics_end(self) -> int:
        """Byte offset just past the last complete line of the local metrics.jsonl."""
        path = self._local(METRICS)
        if not os.path.exists(path):
            return 0
        with open(path, "rb") as f:
            data = f.read()
        return data.rfind(b"\n") + 1

    def sync(self, wait: bool) -> bool:
        """Hand every change since the last sync to the upload thread (what is read is read now,
        on this thread); with `wait`, return once every upload has finished: whether all did."""
        self._last_sync = time.time()
        try:
            self._submit_changes()
        except OSError as e:  # a file replaced while listing: the next sync takes it
            log.warning("run mirror: %s; retried at the next sync", e)
            return False
        return self._drain() if wait else True

    def _submit_changes(self) -> None:
        end = self._metrics_end()
        if end - self._part_offset != self._part_sent and end >= self._part_offset:
            with open(self._local(METRICS), "rb") as f:
                f.seek(self._part_offset)
                data = f.read(end - self._part_offset)
            self._submit(naming.metrics_part(self._part_after), data, size=len(data))
        changed = [rel for rel in COPIES if os.path.exists(self._local(rel))]
        samples = self._local(naming.SAMPLES_DIR)
        if os.path.isdir(samples):
            changed += [naming.grid(step) for step in naming.grid_steps(os.listdir(samples))]
        for rel in changed:
            st = os.stat(self._local(rel))
            if self._synced.get(rel) != (st.st_mtime_ns, st.st_size):
                with open(self._local(rel), "rb") as f:
                    self._submit(rel, f.read(), stamp=(st.st_mtime_ns, st.st_size))

    def _submit(self, rel: str, data: bytes, stamp=None, size: Optional[int] = None) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-mirror")
        self._pending = [(r, f) for r, f in self._pending if not f.done() or f.exception() is not None]
        future = self._pool.submit(storage.write_bytes, self._remote(rel), data)
        self._pending.append((rel, future))

        if size is not None:
            self._part_sent = size  # optimistic: a failed upload is found by _drain, or sent again after the next change
        if stamp is not None:
            self._synced[rel] = stamp

        def done(f, rel=rel):
            if f.exception() is not None:
                log.warning("run mirror: uploading %s failed (%s); retried at the next sync", rel, f.exception())
                self._synced.pop(rel, None)

        future.add_done_callback(done)

    def _drain(self) -> bool:
        """Wait for every upload; what failed is read and uploaded once more (training never
        stops for the mirror: a second failure is logged and left to the next sync)."""
        for attempt in range(2):
            pending, self._pending = self._pending, []
            failed = [rel for rel, f in pending if f.exception() is not None]  # exception() waits
            if not failed:
                return True
            if attempt == 0:
                self._part_sent = -1
                self._synced = {k: v for k, v in list(self._synced.items()) if k not in failed}
                self._submit_changes()
        log.error("run mirror: uploads to %s failed twice (%s); the next sync tries again", self.remote, ", ".join(failed))
        return False
