"""Parameter and compute accounting of a model config, measured on the meta device (shapes
only, no memory): parameters of the trunk and of the output path (detailer head(s), injection,
or the DiT final layer), and multiply-accumulates of one forward pass counted by PyTorch's
FlopCounterMode. Used by dip-summary and for MFU during training."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dip_scale.models import build_model
from dip_scale.models.dip import HEAD_MODULES


def summarize(model_cfg) -> dict:
    with torch.device("meta"):
        model = build_model(model_cfg)
        s = model_cfg.image_size
        x = torch.empty(1, 3, s, s)
        t = torch.empty(1)
        y = torch.zeros(1, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    params_head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    head = sum(sum(counts.get(f"DiP.{m}", {}).values()) for m in HEAD_MODULES)
    trunk = model.trunk
    return {
        "preset": model_cfg.preset,
        "head": model_cfg.head.type,
        "placement": model_cfg.head.placement,
        "image_size": s,
        "patch_size": trunk.patch_size,
        "tokens": (s // trunk.patch_size) ** 2,
        "depth": trunk.depth,
        "hidden_size": trunk.hidden_size,
        "params": params,
        "params_trunk": params - params_head,
        "params_head": params_head,
        "gmacs_per_image": total / 2e9,
        "gmacs_trunk": (total - head) / 2e9,
        "gmacs_head": head / 2e9,
    }


def _macs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(counter.get_flop_counts()["Global"].values()) / 2


def trained_macs_per_image(model_cfg, repa=None) -> float:
    """Multiply-accumulates of one image's forward through everything that is trained: the DiP
    and, with REPA, the projector on its tokens (the frozen encoder is not trained: see
    encoder_macs_per_image). The numerator of MFU, with x3 for the backward."""
    macs = summarize(model_cfg)["gmacs_per_image"] * 1e9
    if repa is not None:
        import copy

        trunk = model_cfg.trunk()
        tokens = (model_cfg.image_size // trunk.patch_size) ** 2
        projector = copy.deepcopy(repa.projector).to("meta")
        macs += _macs(lambda: projector(torch.empty(1, tokens, trunk.hidden_size, device="meta")))
    return macs


def encoder_macs_per_image(encoder) -> float:
    """Multiply-accumulates of the frozen REPA encoder on one image (reported beside MFU, not in it)."""
    import copy

    vit = copy.deepcopy(encoder.vit).to("meta")
    r = encoder.resolution
    return _macs(lambda: vit(torch.empty(1, 3, r, r, device="meta")))


def saved_activation_bytes(model, *inputs) -> int:
    """Bytes of the tensors one training forward keeps for its backward (distinct storages, the
    parameters excluded): what activation checkpointing trades for recomputation."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(seen.values())
