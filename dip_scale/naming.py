"""Every name a run writes into its save folder, defined once (docs/architecture.md, "Naming").

    <save_folder>/ep{epoch}-ba{batch}-rank{rank}.tar     one DeepSpeed/Composer checkpoint tar per rank
    <save_folder>/ep{epoch}-ba{batch}.manifest.json      rank 0's record of a step's tars (sizes, sha256, HMAC)
    <save_folder>/ep{epoch}-ba{batch}-universal.tar      its DeepSpeed universal form, made for an elastic resume
    <save_folder>/ep{epoch}-ba{batch}.universal.json     the record of that tar (size, sha256, HMAC, source)
    <save_folder>/latest-rank{rank}.tar[.symlink]        Composer's pointer to the latest tar (a hint only)
    <save_folder>/ema/ep{epoch}-ba{batch}.safetensors    the EMA export of that step (a model file)
    <save_folder>/eval/ep{epoch}-ba{batch}[-cfg{s}].json evaluation result of that export (at guidance scale s of a sweep),
                                                          with .png (first samples) and .samples.npz (eval.save_npz) beside it

and every name a run writes into its run folder (`run_dir`, mirrored by training/mirror.py):

    <run_dir>/config.yaml            the resolved config the run was started with
    <run_dir>/metrics.jsonl          one JSON object per logged step
    <run_dir>/samples/ba{batch}.png  the EMA sample grid of that step
    <run_dir>/fid.jsonl  fid.png     the evaluation results (one row per step and scale) and their curves
    <run_dir>/loss.png               the loss curve (tools/demo.py draws it at the end)
    <mirror>/metrics/{after:012d}.jsonl   metrics.jsonl in parts, sealed at each checkpoint

Code passes `Step` records around; names are parsed only where a folder listing is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SAVE_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.tar"  # plain .tar: DeepSpeed's *.pt.tar breaks Composer's autoresume
LATEST_FILENAME = "latest-rank{rank}.tar"
STEM = "ep{epoch}-ba{batch}"  # Composer format string of a step (EMA exports, manifests, eval results)
EMA_DIR = "ema"
EVAL_DIR = "eval"

RUN_CONFIG = "config.yaml"
RUN_METRICS = "metrics.jsonl"
RUN_EVALS = "fid.jsonl"
RUN_EVAL_PLOT = "fid.png"
RUN_LOSS_PLOT = "loss.png"
SAMPLES_DIR = "samples"
METRICS_PARTS_DIR = "metrics"

_TAR = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.tar$")
_MANIFEST = re.compile(r"^ep(\d+)-ba(\d+)\.manifest\.json$")
_EXPORT = re.compile(r"^ep(\d+)-ba(\d+)\.safetensors$")
_UNIVERSAL = re.compile(r"^ep(\d+)-ba(\d+)(-universal\.tar|\.universal\.json)$")
_GRID = re.compile(r"^ba(\d+)\.png$")
_PART = re.compile(r"^(\d{12})\.jsonl$")


@dataclass(frozen=True, order=True)
class Step:
    """A point of a run where a checkpoint was taken; ordered by batch."""

    batch: int
    epoch: int

    @property
    def stem(self) -> str:
        return STEM.format(epoch=self.epoch, batch=self.batch)

    def tar(self, rank: int | str) -> str:
        return SAVE_FILENAME.format(epoch=self.epoch, batch=self.batch, rank=rank)

    @property
    def manifest(self) -> str:
        return f"{self.stem}.manifest.json"

    @property
    def universal(self) -> tuple[str, str]:
        """(universal tar, its record)."""
        return f"{self.stem}-universal.tar", f"{self.stem}.universal.json"

    @property
    def export(self) -> str:
        return f"{EMA_DIR}/{self.stem}.safetensors"

    def evaluation(self, cfg_scale: Optional[float] = None) -> str:
        """Name (no suffix) of the evaluation of this step's export: `eval/ep1-ba500`, or
        `eval/ep1-ba500-cfg2.9` for one scale of a guidance sweep (eval.cfg_scales)."""
        return f"{EVAL_DIR}/{self.stem}" + ("" if cfg_scale is None else f"-cfg{cfg_scale:g}")


def parse_tar(name: str) -> Optional[tuple[Step, int]]:
    """(step, rank) of a checkpoint tar's file name, None for any other name."""
    m = _TAR.match(name)
    return (Step(batch=int(m[2]), epoch=int(m[1])), int(m[3])) if m else None


def parse_manifest(name: str) -> Optional[Step]:
    m = _MANIFEST.match(name)
    return Step(batch=int(m[2]), epoch=int(m[1])) if m else None


def parse_export(name: str) -> Optional[Step]:
    """The step of an EMA export's file name (`ep3-ba500.safetensors`), None for any other."""
    m = _EXPORT.match(name)
    return Step(batch=int(m[2]), epoch=int(m[1])) if m else None


def is_run_artefact(relpath: str) -> bool:
    """Whether a path relative to the save folder is something a run writes there."""
    base = relpath.rsplit("/", 1)[-1]
    if parse_tar(base) or parse_manifest(base) or _UNIVERSAL.match(base) or base.startswith("latest-rank"):
        return True
    top = relpath.split("/", 1)[0]
    return top in (EMA_DIR, EVAL_DIR) and "/" in relpath


def grid(batch: int) -> str:
    """The sample grid of a step, relative to run_dir: `samples/ba500.png`."""
    return f"{SAMPLES_DIR}/ba{batch}.png"


def parse_grid(name: str) -> Optional[int]:
    """The step of a grid's file name (`ba500.png`), None for any other name."""
    m = _GRID.match(name)
    return int(m[1]) if m else None


def grid_steps(names) -> list[int]:
    """The steps of the sample grids among file names (a listing of run_dir/samples), in order."""
    return sorted(s for n in names if (s := parse_grid(n)) is not None)


def metrics_part(after: int) -> str:
    """The mirror's part of metrics.jsonl holding the lines after checkpoint step `after`."""
    return f"{METRICS_PARTS_DIR}/{after:012d}.jsonl"


def parse_metrics_part(name: str) -> Optional[int]:
    m = _PART.match(name)
    return int(m[1]) if m else None
