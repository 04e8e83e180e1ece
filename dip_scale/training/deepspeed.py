"""The DeepSpeed boundary: the YAML's `deepspeed:` section (DeepSpeed's own schema) checked
before anything is built, the Composer precision it implies, and CPU quirks.

DeepSpeed silently ignores unknown top-level keys (a misspelt `zero_optimisation` trains without
ZeRO) and type-checks few scalars, so unknown keys are rejected here with a did-you-mean, the
strict pydantic blocks (zero_optimization, bf16, fp16) are run standalone for exact key paths,
and Composer's own rules are applied (it owns the batch keys, optimizer and scheduler).

Mixed precision, two ways; in both, the batch reaching Composer is integer (uint8 pixels, int64
labels: its bf16 batch cast touches neither) and the flow times, noise, x_t, the time sinusoid and
the MSE target are made in fp32 inside the model:
  * `bf16: {enabled: true}` (the paper configs): DeepSpeed's bf16 parameters with fp32 master
    weights in the optimizer (which the EMA reads); x_t is cast to bf16 at the first layer.
  * `torch_autocast: {enabled: true, dtype: bfloat16}`: fp32 parameters, bf16 matmuls under
    autocast, like the released code's bf16-mixed; more memory, norms stay fp32.
"""
from __future__ import annotations

import difflib
import importlib
import numbers
from typing import Any

TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "bf16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_types", "dataloader_drop_last",
    "disable_allgather", "dump_state", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_clipping",
    "gradient_predivide_factor", "memory_breakdown", "prescale_gradients", "steps_per_print", "tensorboard", "timers",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu", "wall_clock_breakdown", "wandb",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})
OWNED_BY_COMPOSER = {
    "optimizer": "the optimiser comes from the `optimizer:` section",
    "scheduler": "the schedule comes from `optimizer.warmup`",
    "train_batch_size": "set data.batch_size (the global batch)",
    "train_micro_batch_size_per_gpu": "set trainer.device_train_microbatch_size",
    "gradient_accumulation_steps": "it follows from data.batch_size / world size / trainer.device_train_microbatch_size",
}
_SCALARS = {  # DeepSpeed accepts any type here and fails at the first step
    "gradient_clipping": "number", "gradient_predivide_factor": "number", "steps_per_print": "int",
    "prescale_gradients": "bool", "wall_clock_breakdown": "bool", "memory_breakdown": "bool",
    "zero_allow_untested_optimizer": "bool", "zero_force_ds_cpu_optimizer": "bool", "dump_state": "bool",
}


def _scalar_problem(key: str, value: Any) -> str | None:
    kind = _SCALARS.get(key)
    if kind is None:
        return None
    if kind == "bool":
        ok, want = isinstance(value, bool), "true/false"
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        ok, want = False, "a number"
    elif kind == "int":
        ok, want = isinstance(value, int) and value > 0, "a positive integer"
    else:
        ok, want = value >= 0, "a non-negative number"
    return None if ok else f"deepspeed.{key}: expected {want}, got {value!r}"


def precision_for(ds: dict[str, Any]) -> str:
    """The Composer `precision` matching the DeepSpeed section (Composer insists they agree)."""
    if (ds.get("bf16") or {}).get("enabled"):
        return "amp_bf16"
    if (ds.get("fp16") or {}).get("enabled"):
        return "amp_fp16"
    return "fp32"  # also for torch_autocast: DeepSpeed autocasts inside, Composer must not cast


def validate_deepspeed(ds: dict[str, Any], *, on_gpu: bool) -> list[str]:
    """Every problem of the `deepspeed:` section, as config-style messages (empty: fine)."""
    import pydantic
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    problems = []
    for key, value in ds.items():
        if key in OWNED_BY_COMPOSER:
            problems.append(f"deepspeed.{key}: not set here: {OWNED_BY_COMPOSER[key]}")
        elif key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1, cutoff=0.6)
            problems.append(f"unknown key 'deepspeed.{key}'" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + " (DeepSpeed would silently ignore it)")
        elif (msg := _scalar_problem(key, value)) is not None:
            problems.append(msg)
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config), ("fp16", DeepSpeedFP16Config)):
        if key not in ds:
            continue
        if not isinstance(ds[key], dict):
            problems.append(f"deepspeed.{key}: expected a mapping, got {ds[key]!r}")
            continue
        try:
            model(**ds[key])
        except pydantic.ValidationError as e:
            for err in e.errors():
                path = ".".join(str(p) for p in ("deepspeed", key, *err["loc"]))
                problems.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    zero = ds.get("zero_optimization") or {}
    if isinstance(zero, dict):
        if zero.get("round_robin_gradients"):
            problems.append("deepspeed.zero_optimization.round_robin_gradients: not supported (DeepSpeed 0.19 maps "
                            "fp32 master fragments wrongly with it, which would corrupt the EMA)")
        offload = zero.get("offload_optimizer") or {}
        if isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme") and ds.get("zero_force_ds_cpu_optimizer", True):
            problems.append("deepspeed.zero_optimization.offload_optimizer needs deepspeed.zero_force_ds_cpu_optimizer: false "
                            "(our AdamW is a torch optimizer)")
        if isinstance(offload, dict) and offload.get("device") == "nvme":
            problems.append("deepspeed.zero_optimization.offload_optimizer.device: nvme swaps the fp32 master weights the EMA reads; use cpu")
    precision = precision_for(ds)
    if not on_gpu and precision != "fp32":
        problems.append(f"deepspeed.{'bf16' if precision == 'amp_bf16' else 'fp16'}.enabled: needs a GPU (Composer trains "
                        "in fp32 on CPU); disable it or use deepspeed.torch_autocast")
    if (ds.get("bf16") or {}).get("enabled") and (ds.get("fp16") or {}).get("enabled"):
        problems.append("deepspeed.bf16.enabled and deepspeed.fp16.enabled: pick one")
    return problems


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at init (~40 s,
    needs g++) that only inference uses; training over gloo never calls it."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
