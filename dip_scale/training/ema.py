"""fp32 EMA of the DiP weights, sharded like DeepSpeed's fp32 master weights, checkpointed and
exported as one safetensors file per checkpoint.

Why our own: Composer's EMA keeps a bf16 copy under DeepSpeed bf16, holds 0 elements under
ZeRO-3 (partitioned params) and is lost on resume. Here each rank keeps, in fp32, the EMA of
exactly the slice of each parameter whose fp32 master copy it owns (ZeRO-1/2: `_hp_mapping`
fragments; ZeRO-3: its partition), updated after every optimizer step with
    ema = decay * ema + (1 - decay) * w_fp32_master.
Memory per rank is 4 bytes x params / world size. The full EMA is assembled on rank 0 by
summing zero-padded disjoint slices (exact), for checkpoints, exports and sample grids.

Composer's DeepSpeed checkpoints carry only rank 0's callback state, so `state_dict()`
assembles the full EMA (a collective, called on every rank) and `load_state_dict()` lets each
rank slice out its own part: this also survives a change of world size.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as tdist
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist, format_name_with_dist_and_time

from dip_scale import storage
from dip_scale.naming import Step

log = logging.getLogger(__name__)
PREFIX = "model."  # the DiP inside the ComposerModel; the REPA projector is not averaged


def owned_fragments(state: State, prefix: str = PREFIX) -> tuple[dict, dict]:
    """-> ({name: (fp32 master view, start, numel)} owned by this rank,
           {name: (full numel, shape)} for every trainable parameter under `prefix`, which is
           stripped from the names)."""
    if not state.deepspeed_enabled:
        raise RuntimeError("the EMA callback reads DeepSpeed's fp32 master weights: train with a deepspeed: section")
    frags, meta = {}, {}
    engine = state.deepspeed_model
    opt = engine.optimizer
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in engine.module.named_parameters():
        if not name.startswith(prefix) or not p.requires_grad:
            continue
        name = name[len(prefix) :]
        if zero3:
            meta[name] = (p.ds_numel, tuple(p.ds_shape))
            group, offset, count = opt.grad_position[opt.get_param_id(p)]
            pn = p.partition_numel()
            start = tdist.get_rank(group=p.ds_process_group) * pn
            numel = max(0, min(pn, p.ds_numel - start))  # the last rank's partition is padded
            if numel:
                frags[name] = (opt.fp32_partitioned_groups_flat[group].narrow(0, offset, count).narrow(0, 0, numel), start, numel)
        else:
            meta[name] = (p.numel(), tuple(p.shape))
            mapping = getattr(p, "_hp_mapping", None)  # None: this rank owns no element of p
            if mapping is not None:
                addr = mapping.lp_fragment_address
                frags[name] = (mapping.get_hp_fragment(), addr.start, addr.numel)
    return frags, meta


class EMA(Callback):
    def __init__(self, decay: float, model_cfg, save_folder: Optional[str], save_interval: str, run_name: str, stem: str = "ep{epoch}-ba{batch}"):
        self.decay = decay
        self.model_cfg = model_cfg
        self.save_folder = save_folder
        self.run_name = run_name
        self.stem = stem
        self.should_export = create_interval_scheduler(save_interval) if save_folder else None
        self.shadow: dict[str, tuple[torch.Tensor, int, int]] = {}
        self.updates = 0
        self.exported: list[tuple[Step, str]] = []  # (step, model file) of every export of this process
        self._pending_full: Optional[dict[str, torch.Tensor]] = None
        self._cache: Optional[tuple[int, Optional[dict[str, torch.Tensor]]]] = None
        self._meta: dict = {}
        self._state: Optional[State] = None
        self._last_export_batch = -1
        self.export_at_start = False  # set for runs that start from trainer.init_from

    # ------------------------------------------------------------------ shards
    def fit_start(self, state: State, logger: Logger) -> None:
        self._state = state
        frags, self._meta = owned_fragments(state)
        with torch.no_grad():
            if self._pending_full is not None:  # resumed: take my slice of the checkpointed EMA
                full = self._pending_full
                missing = set(self._meta) - set(full)
                if missing:
                    raise RuntimeError(f"checkpointed EMA lacks parameters {sorted(missing)[:5]}: the model changed since it was saved")
                self.shadow = {
                    n: (full[n].reshape(-1).narrow(0, s, k).to(src.device, torch.float32).clone(), s, k)
                    for n, (src, s, k) in frags.items()
                }
                self._pending_full = None
            elif not self.shadow:  # fresh run: start from the initial weights
                self.shadow = {n: (src.detach().float().clone(), s, k) for n, (src, s, k) in frags.items()}
                if self.export_at_start and state.timestamp.batch.value == 0:
                    self._export(state)  # the starting point of a fine-tune, evaluated like any checkpoint

    def batch_end(self, state: State, logger: Logger) -> None:
        frags, _ = owned_fragments(state)  # re-resolved every step: cheap, and never stale
        names = list(self.shadow)
        if not names:
            self.updates += 1
            return
        with torch.no_grad():
            shadows = [self.shadow[n][0] for n in names]
            sources = [frags[n][0].float() for n in names]
            torch._foreach_mul_(shadows, self.decay)
            torch._foreach_add_(shadows, sources, alpha=1.0 - self.decay)
        self.updates += 1
        self._cache = None

    def gather(self) -> Optional[dict[str, torch.Tensor]]:
        """Full EMA state dict (fp32, CPU) on rank 0, None elsewhere. A collective: every rank
        must call it at the same point. Cached until the next update."""
        if self._cache is not None and self._cache[0] == self.updates:
            return self._cache[1]
        rank0 = dist.get_global_rank() == 0
        device = next(iter(self.shadow.values()))[0].device if self.shadow else torch.device("cpu")
        if dist.get_world_size() > 1 and tdist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, (numel, shape) in self._meta.items():
                buf = torch.zeros(numel, dtype=torch.float32, device=device)
                if name in self.shadow:
                    tensor, start, count = self.shadow[name]
                    buf.narrow(0, start, count).copy_(tensor)
                if dist.get_world_size() > 1:
                    tdist.reduce(buf, dst=0, op=tdist.ReduceOp.SUM)  # disjoint slices: exact
                if rank0:
                    out[name] = buf.view(shape).cpu()
        full = out if rank0 else None
        self._cache = (self.updates, full)
        return full

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        full = self.gather() if self._meta else self._pending_full
        return {"decay": self.decay, "updates": self.updates, "ema": full if full is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        ema = state.get("ema") or None
        if ema:
            self._pending_full = ema
            self.shadow = {}
            if self._state is not None:  # loaded after fit_start (not Composer's order, but be safe)
                self.fit_start(self._state, None)

    # ------------------------------------------------------------------ export
    def export_path(self, state: State) -> str:
        folder = format_name_with_dist_and_time(self.save_folder, self.run_name, state.timestamp)
        stem = format_name_with_dist_and_time(self.stem, self.run_name, state.timestamp)
        return storage.join(folder, "ema", f"{stem}.safetensors")

    def _export(self, state: State) -> None:
        # at an epoch's last batch both BATCH_ and EPOCH_CHECKPOINT fire; Composer saves once (at
        # the first) and so do we, under the same name
        if self._last_export_batch == state.timestamp.batch.value:
            return
        self._last_export_batch = state.timestamp.batch.value
        full = self.gather()
        if full is None:
            return
        from dip_scale.models.export import write_model_file

        path = self.export_path(state)
        write_model_file(path, full, self.model_cfg, step=state.timestamp.batch.value, epoch=state.timestamp.epoch.value,
                         ema_decay=self.decay, run_name=self.run_name)
        self.exported.append((Step(batch=state.timestamp.batch.value, epoch=state.timestamp.epoch.value), path))
        log.info("exported EMA weights: %s", path)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export is not None and self.should_export(state, Event.BATCH_CHECKPOINT):
            self._export(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export is not None and self.should_export(state, Event.EPOCH_CHECKPOINT):
            self._export(state)

    def full_model(self):
        """The EMA as a plain DiP module on rank 0 (None elsewhere); a collective."""
        full = self.gather()
        if full is None:
            return None
        from dip_scale.models import build_model

        model = build_model(self.model_cfg)
        model.load_state_dict(full, strict=True)
        return model.eval()
