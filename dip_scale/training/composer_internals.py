"""Every place dip_scale reaches into Composer 0.27's internals, in one module, each with what
breaks without it. Check them first when moving to another Composer version."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility


class RecordingCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, calling `on_saved(state, local_tar)` on every rank right after
    each save (training/checkpoint.py writes the step's manifest there).

    Composer 0.27: `_save_checkpoint` is the one method every save event goes through, and
    `saved_checkpoints[-1]` is the tar just written. Without the hook there is no point at which
    the tar exists and the step has not yet moved on. Also: the saver polls S3 every 30 s before
    publishing its `latest` pointer (`_symlink_upload_wait_before_next_try_in_seconds`); one HEAD
    request a second costs nothing and adds ~60 s less to every fit() that saves to S3. And:
    `checkpoint._save_deepspeed_model` extracts a tar already at the target path into the new
    checkpoint before writing it (to "append"); on ranks other than 0 that is a leftover of an
    earlier attempt at this step (e.g. the damaged tar a resume fell back past), which would be
    merged into, or crash, the new save. It is removed first. And: for a remote folder the saver
    writes each tar into a `tempfile.mkdtemp()` staging folder before uploading it and never
    removes that folder: every run (every restart) would leave its newest checkpoint in TMPDIR.
    It is removed at close, after the uploads have finished."""

    def __init__(self, folder: str, *, on_saved, **kwargs):
        super().__init__(folder, **kwargs)
        self.on_saved = on_saved
        self._symlink_upload_wait_before_next_try_in_seconds = 1.0
        self._staging = _staging_root(folder, self.folder)

    def _save_checkpoint(self, state: State, logger: Logger):
        target = self.filename.format(state, True)
        if dist.get_global_rank() != 0 and os.path.exists(target):  # rank 0 writes its tar afresh itself
            os.remove(target)
        super()._save_checkpoint(state, logger)
        if self.saved_checkpoints:
            self.on_saved(state, self.saved_checkpoints[-1])

    def post_close(self):
        super().post_close()  # waits for the uploads
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _staging_root(folder: str, local_folder: str) -> str | None:
    """The mkdtemp() folder CheckpointSaver.__init__ put `local_folder` in (remote `folder`s
    only), or None. Only a folder directly in TMPDIR is ever named, whatever the path was."""
    from composer.utils import parse_uri

    backend, _, path = parse_uri(folder)
    if not backend:
        return None
    root = Path(local_folder)
    for _ in Path(path or ".").parts:
        root = root.parent
    ok = root.parent == Path(tempfile.gettempdir()) and root.name.startswith("tmp")
    return str(root) if ok else None


class RestoreRNG(Callback):
    """Composer 0.27 restores the checkpointed per-rank RNG only at an epoch boundary or while
    spinning a non-resumable loader; a mid-epoch resume of a StreamingDataset continues from a
    fresh seed instead, so diffusion noise and times would diverge from the uninterrupted run.
    This takes Composer's private `Trainer._rng_state` and puts it back just before the first
    resumed batch is fetched."""

    def __init__(self):
        self._rng = None

    def take_over(self, trainer) -> None:
        """Call right after building the Trainer."""
        state = trainer.state
        if getattr(trainer, "_rng_state", None) is not None and state.dataset_resumption.get("train") and int(state.timestamp.batch_in_epoch) > 0:
            self._rng, trainer._rng_state = trainer._rng_state, None

    def before_dataloader(self, state: State, logger: Logger) -> None:
        if self._rng is not None:
            reproducibility.load_rng_state(self._rng)
            self._rng = None


def cpu_model_from_proc() -> None:
    """Composer 0.27 asks py-cpuinfo for the CPU's name on every rank (`Trainer.__init__` logs
    Composer's environment; every checkpoint's metadata carries it). py-cpuinfo answers from a
    subprocess of its own that forks a cpuid probe: ~2.5 s on every rank before the first step.
    On Linux the same name is /proc/cpuinfo's `model name` line; where there is none (e.g. ARM),
    Composer's own query stays."""
    from composer.utils import collect_env

    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return
    if name:
        collect_env.get_cpu_model = lambda: name  # get_composer_env_dict looks it up at each call


TEST_ONLY_CPU_BF16 = "DIP_SCALE_TEST_ONLY_CPU_BF16"  # never a user setting: see cpu_bf16_for_tests


def cpu_bf16_for_tests() -> bool:
    """Whether the test-only switch is on that lets the paper's precision path (DeepSpeed
    `bf16.enabled`: bf16 parameters, fp32 master weights) run on a CPU, so CI executes it
    (README, "What bf16 on CPU covers")."""
    return os.environ.get(TEST_ONLY_CPU_BF16) == "1"


def allow_bf16_on_cpu() -> None:
    """Composer 0.27 refuses any precision but fp32 on a CPU (`trainer._validate_precision`)
    although under DeepSpeed it applies no autocast of its own (its precision context is a
    no-op): DeepSpeed casts the module and keeps the fp32 masters itself. Lifting the refusal is
    all it takes; only `cpu_bf16_for_tests` calls this."""
    import composer.trainer.trainer as trainer_module

    trainer_module._validate_precision = lambda precision, device: None
