"""The model section of the experiment config (`model:`), owned by the models it describes:
the head and placement choices, the init recipe, and the rules a model config must satisfy.
Pure Python (no torch), so the config is checked in well under a second."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dip_scale.models.presets import PRESETS, TrunkSpec, resolve_trunk
from dip_scale.schema import ConfigError, apply_override, build, not_a_choice, read_yaml

HeadType = Literal["conv_unet", "mlp", "coord_mlp", "patch_attention", "none"]
Placement = Literal["post_hoc", "intermediate", "hybrid"]
Init = Literal["released", "dit"]


@dataclass
class HeadConfig:
    type: HeadType = "conv_unet"
    placement: Placement = "post_hoc"
    # intermediate/hybrid: the head runs after this many trunk blocks (default: half the depth)
    inject_after: Optional[int] = None
    # conv_unet: channels of the down path; one 2x max-pool per entry (paper: 64,128,256,512)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    # conv_unet: how the up path doubles resolution (released code: transposed conv)
    upsample: Literal["transposed", "interpolate"] = "transposed"
    # mlp / coord_mlp / patch_attention: hidden width and number of layers (None: per-type default)
    width: Optional[int] = None
    depth: Optional[int] = None


@dataclass
class ModelConfig:
    preset: str = "XL/16"
    image_size: int = 256
    num_classes: int = 1000
    # optional overrides of the preset's trunk (paper Table 2 "scaling up DiT" rows)
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    # released: only the patch, time and label embeddings are initialised explicitly, everything
    # else keeps PyTorch's defaults (the released DiP, where the paper's numbers come from);
    # dit: DiT's recipe (xavier linears, adaLN-zero, zero output layer)
    init: Init = "released"
    # torch.compile of each trunk block for training (DiP.compile_trunk: in place, so names
    # stay; compile time independent of depth); compile_mode is torch.compile's mode
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # recompute each trunk block in the backward pass instead of keeping its activations
    # (non-reentrant; the detailer head is cheap and is not checkpointed)
    activation_checkpointing: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)

    def trunk(self) -> TrunkSpec:
        return resolve_trunk(self.preset, depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads)


# Fields that decide the architecture (the tensors and their shapes); `init` only decides the
# starting values and compile / activation_checkpointing how training runs, so a model file
# made under one setting serves a config with another.
ARCHITECTURE_FIELDS = ("preset", "image_size", "num_classes", "depth", "hidden_size", "num_heads", "head")


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """'key: a != b' for each architecture field on which two model configs differ."""
    import dataclasses

    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = []
    for name in ARCHITECTURE_FIELDS:
        if name == "head":
            out += [f"head.{k}: {da['head'][k]!r} != {db['head'][k]!r}" for k in da["head"] if da["head"][k] != db["head"][k]]
        elif da[name] != db[name]:
            out.append(f"{name}: {da[name]!r} != {db[name]!r}")
    return out


def model_problems(m: ModelConfig, prefix: str = "model.") -> list[str]:
    """Every rule a model config breaks, one line each (empty: buildable)."""
    errs: list[str] = []
    h = m.head
    if m.preset not in PRESETS:
        return [not_a_choice(f"{prefix}preset", m.preset, PRESETS)]
    for name in ("depth", "hidden_size", "num_heads"):
        v = getattr(m, name)
        if v is not None and v < 1:
            errs.append(f"{prefix}{name}: must be >= 1, got {v}")
    if errs:
        return errs
    trunk = m.trunk()
    p = trunk.patch_size
    if trunk.hidden_size % trunk.num_heads or (trunk.hidden_size // trunk.num_heads) % 4:
        errs.append(
            f"{prefix.rstrip('.')}: hidden_size {trunk.hidden_size} / num_heads {trunk.num_heads} must give a head "
            "dimension divisible by 4 (2D RoPE rotates pairs along two axes)"
        )
    if m.image_size <= 0 or m.image_size % p:
        errs.append(f"{prefix}image_size: {m.image_size} is not a positive multiple of the patch size {p} ({m.preset})")
    if m.num_classes < 1:
        errs.append(f"{prefix}num_classes: must be >= 1, got {m.num_classes}")
    if h.type == "none" and h.placement != "post_hoc":
        errs.append(
            f"{prefix}head.placement: {h.placement!r} needs a detailer head, but {prefix}head.type is 'none' "
            "(the DiT-only baseline); set it to conv_unet, mlp, coord_mlp or patch_attention"
        )
    if h.placement != "post_hoc" and h.type != "none":
        k = h.inject_after if h.inject_after is not None else trunk.depth // 2
        if not 1 <= k <= trunk.depth - 1:
            errs.append(f"{prefix}head.inject_after: must be in 1..{trunk.depth - 1} for a {trunk.depth}-block trunk, got {k}")
    if h.type == "conv_unet":
        if not h.channels or any(c < 1 for c in h.channels):
            errs.append(f"{prefix}head.channels: expected a non-empty list of positive widths, got {h.channels}")
        elif p % (2 ** len(h.channels)):
            errs.append(
                f"{prefix}head.channels: {len(h.channels)} levels halve a {p}x{p} patch {len(h.channels)} times; "
                f"the patch size must be divisible by {2 ** len(h.channels)} (use at most "
                f"{(p & -p).bit_length() - 1} levels)"
            )
    for name in ("width", "depth"):
        v = getattr(h, name)
        if v is not None and v < 1:
            errs.append(f"{prefix}head.{name}: must be >= 1, got {v}")
    return errs


def load_model_config(path: Optional[str], overrides: tuple[str, ...] | list[str] = ()) -> ModelConfig:
    """The `model:` section of an experiment YAML (with `base:` and `model.*` overrides), checked
    on its own: for tools that need the architecture only (importing or summarising weights),
    so the rest of a paper YAML need not fit the model being described."""
    raw = read_yaml(path) if path is not None else {}
    foreign = [o for o in overrides if not o.strip().startswith("model.")]
    if foreign:
        raise ConfigError(f"only model.* overrides apply here, got {', '.join(foreign)}")
    for item in overrides:
        apply_override(raw, item)
    errors: list[str] = []
    model = build(ModelConfig, raw.get("model") or {}, "model.", errors)
    errors = errors or model_problems(model)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n  " + "\n  ".join(errors))
    return model
