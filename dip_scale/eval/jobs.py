"""What the eval dispatcher hands a backend: one evaluation of one EMA export at one guidance
scale, as a record (never re-parsed from names), and the interface every backend implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from dip_scale.naming import Step


@dataclass(frozen=True)
class EvalJob:
    model_file: str  # <save_folder>/ema/<stem>.safetensors
    step: Step
    cfg_scale: Optional[float] = None  # None: the sampler's scale (eval.cfg_scales unset)

    @property
    def save_folder(self) -> str:
        return self.model_file.rsplit("/", 2)[0]

    @property
    def name(self) -> str:
        """`ep1-ba500` or `ep1-ba500-cfg2.9`: unique per (checkpoint, scale) within a run."""
        return self.step.evaluation(self.cfg_scale).rsplit("/", 1)[1]

    @property
    def result(self) -> str:
        return f"{self.save_folder}/{self.step.evaluation(self.cfg_scale)}.json"

    @property
    def grid(self) -> str:
        return self.result.removesuffix(".json") + ".png"

    @property
    def samples_npz(self) -> str:
        return self.result.removesuffix(".json") + ".samples.npz"


class EvalBackend(Protocol):
    """Where eval jobs run (local child processes, Kubernetes Jobs). Called on rank 0 only, from
    the training thread: every call returns quickly."""

    def check(self) -> None:
        """At start-up, before the Trainer is built: raise ConfigError (with the fix) when jobs
        could not be created at all (no cluster, no permission, admission refusal)."""

    def submit(self, job: EvalJob, argv: list[str]) -> None:
        """Start (or queue) `argv` for `job`; an identical job that already exists is left alone."""

    def poll(self) -> list[tuple[EvalJob, str]]:
        """-> jobs that failed for good since the last poll, each with its reason (a failed
        attempt is retried up to eval.max_retries before it is reported)."""

    def started(self, job: EvalJob) -> bool:
        """Dispatched before this process (a restart) and still running or already done."""

    def busy(self) -> bool:
        """Jobs of this process still queued or running (for eval.wait_at_end)."""

    def finish(self, wait: bool) -> None:
        """Training ends: with `wait`, return when every job has ended; else leave them to run."""
