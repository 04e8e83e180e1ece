"""Import a released DiP checkpoint (NJU-PCALab/DiP, a PyTorch Lightning `.ckpt`) as a
dip_scale model file, so the paper's weights sample, evaluate and fine-tune here unchanged.

    dip-import-released CKPT CONFIG.yaml [key.path=value ...] \\
        --out MODEL.safetensors [--weights ema|online]

CKPT is `.ckpt` / `.pt` / `.pth` (read with `torch.load(weights_only=True)`: nothing pickled is
ever executed) or `.safetensors`, local or s3://. Its `state_dict` holds `denoiser.*` (online
weights), `ema_denoiser.*` (the EMA the paper samples from; the default) and
`diffusion_trainer.proj.*` (the REPA projector, kept as `aux.repa_projector.*`). A bare state
dict of the released DiP (no prefixes) is accepted too.

Conventions (docs/architecture.md, "Time convention"): the released net takes r = 1 - t (r = 0 is
noise) and predicts x0 - eps; ours takes t and predicts eps - x0. Both fold exactly into the
weights: the sinusoid of 1 - t is a fixed rotation R of the sinusoid of t per frequency, so the
first time-MLP weight becomes W R, and the sign goes into the head's output convolution. Every
other tensor maps one to one (the trunk's RoPE layout is the released one), except the SwiGLU
input, where ours holds the released w1 and w3 stacked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from typing import Callable

import torch

from dip_scale import storage

WEIGHT_SETS = {"ema": "ema_denoiser.", "online": "denoiser."}
REPA_PREFIX = "diffusion_trainer."
REPA_PROJECTOR = "diffusion_trainer.proj.0."  # the released projector: Sequential(Sequential(lin, silu, lin, silu, lin))
CONVERT_HINT = (
    "convert it once, where you trust the file, to safetensors and import that: python -c \"import torch; "
    "from safetensors.torch import save_file; sd = torch.load('{path}', map_location='cpu', weights_only=False)"
    "['state_dict']; save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path}.safetensors')\""
)


class ReleasedCheckpointError(ValueError):
    """A released checkpoint that cannot be imported, worded for the user (the file and key named)."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint file by name (a Lightning checkpoint's `state_dict`)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ReleasedCheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no copy of a 10 GB file in memory
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except FileNotFoundError:
        raise ReleasedCheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and torch's wrappers of it
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            first = str(e).strip().splitlines()[0][:300]
            raise ReleasedCheckpointError(
                f"{path}: refused: it holds pickled objects other than tensors and plain containers, and this tool "
                f"never unpickles code ({first}). If you trust the file, " + CONVERT_HINT.format(path=path)
            ) from None
        raise ReleasedCheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReleasedCheckpointError(f"{path}: expected a Lightning checkpoint with a `state_dict` of tensors, or a state dict")
    return obj


def select_weights(tensors: dict[str, torch.Tensor], weights: str, path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """-> (the DiP tensors of the chosen set without prefix, the REPA projector's tensors, the
    prefix used). Tensors under a prefix the release does not write are an error."""
    if weights not in WEIGHT_SETS:
        raise ReleasedCheckpointError(f"--weights: {weights!r}; valid: {', '.join(WEIGHT_SETS)}")
    prefixed = any(k.startswith(tuple(WEIGHT_SETS.values())) for k in tensors)
    if not prefixed:  # a bare state dict of the released DiP
        return dict(tensors), {}, ""
    prefix = WEIGHT_SETS[weights]
    chosen = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not chosen:
        have = sorted({k.split(".", 1)[0] + ".*" for k in tensors})
        raise ReleasedCheckpointError(f"{path}: no {prefix}* tensors for --weights {weights} (the file holds {', '.join(have)})")
    known = tuple(WEIGHT_SETS.values()) + (REPA_PREFIX,)
    foreign = sorted(k for k in tensors if not k.startswith(known))
    if foreign:
        raise ReleasedCheckpointError(f"{path}: unexpected tensors outside {', '.join(p + '*' for p in known)}: "
                           f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}")
    projector = {k[len(REPA_PROJECTOR):]: v for k, v in tensors.items() if k.startswith(REPA_PROJECTOR)}
    return chosen, projector, prefix


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------
def time_fold(weight: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """W -> W R with R the rotation taking [cos(t f), sin(t f)] to [cos((1-t) f), sin((1-t) f)]:
    cos((1-t)f) = cos f cos tf + sin f sin tf and sin((1-t)f) = sin f cos tf - cos f sin tf."""
    half = freqs.numel()
    w = weight.double()
    c, s = freqs.double().cos(), freqs.double().sin()
    w_cos, w_sin = w[:, :half], w[:, half:]
    return torch.cat([w_cos * c + w_sin * s, w_cos * s - w_sin * c], dim=1).to(weight.dtype)


def released_rules(levels: int) -> list[tuple[str, Callable[[re.Match], list[str]]]]:
    """(our-name pattern, released source names) for every tensor the released DiP has."""
    same = lambda m: [m[0]]  # noqa: E731
    return [
        (r"x_embed\.(weight|bias)", lambda m: [f"s_embedder.proj.{m[1]}"]),
        (r"t_embed\.mlp\.[02]\.(weight|bias)", lambda m: [m[0].replace("t_embed", "t_embedder")]),
        (r"y_embed\.table\.weight", lambda m: ["y_embedder.embedding_table.weight"]),
        (r"blocks\.\d+\.(norm1|norm2)\.weight", same),
        (r"blocks\.\d+\.attn\.(qkv\.weight|q_norm\.weight|k_norm\.weight|proj\.weight|proj\.bias)", same),
        (r"(blocks\.\d+\.mlp)\.w12\.weight", lambda m: [f"{m[1]}.w1.weight", f"{m[1]}.w3.weight"]),  # gate, up
        (r"(blocks\.\d+\.mlp)\.w3\.weight", lambda m: [f"{m[1]}.w2.weight"]),  # down
        (r"(blocks\.\d+)\.adaLN\.(weight|bias)", lambda m: [f"{m[1]}.adaLN_modulation.0.{m[2]}"]),
        (r"head\.down\.(\d+)\.0\.(weight|bias)", lambda m: [f"local_decoder.enc{int(m[1]) + 1}.0.{m[2]}"]),
        (r"head\.bottleneck\.0\.(weight|bias)", lambda m: [f"local_decoder.bottleneck.0.{m[1]}"]),
        (r"head\.up\.(\d+)\.(weight|bias)", lambda m: [f"local_decoder.up{levels - int(m[1])}.{m[2]}"]),
        (r"head\.fuse\.(\d+)\.0\.(weight|bias)", lambda m: [f"local_decoder.dec{levels - int(m[1])}.0.{m[2]}"]),
        (r"head\.out\.(weight|bias)", lambda m: [f"local_decoder.out_conv.{m[1]}"]),
    ]


def map_released(released: dict[str, torch.Tensor], model_cfg) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Released DiP tensors (no prefix) -> (our state dict for `model_cfg`, mapping our name ->
    its released sources). Every tensor of our model must have its sources with the right
    shape, and every released tensor must be used: the first problem is named."""
    from dip_scale.models import build_model

    with torch.device("meta"):
        ours = build_model(model_cfg)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    freqs = ours.t_embed.frequencies()
    rules = [(re.compile(p), f) for p, f in released_rules(len(model_cfg.head.channels))]
    out: dict[str, torch.Tensor] = {}
    mapping: dict[str, list[str]] = {}
    for name, shape in expected.items():
        sources = next((f(m) for p, f in rules if (m := p.fullmatch(name))), None)
        if sources is None:
            raise ReleasedCheckpointError(
                f"{name}: the released DiP has no counterpart for this tensor of the configured model "
                f"(model.head.type={model_cfg.head.type}, placement={model_cfg.head.placement}); the release is "
                "conv_unet, post_hoc, upsample transposed")
        for src in sources:
            if src not in released:
                raise ReleasedCheckpointError(f"missing tensor {src} (for {name}) in the released checkpoint; is the config's "
                                   f"architecture the checkpoint's (preset {model_cfg.preset}, image_size {model_cfg.image_size})?")
        tensor = torch.cat([released[s] for s in sources]) if len(sources) > 1 else released[sources[0]]
        if tuple(tensor.shape) != shape:
            got = " + ".join(f"{s} {tuple(released[s].shape)}" for s in sources)
            raise ReleasedCheckpointError(f"shape mismatch for {name}: the model needs {shape}, the checkpoint has {got}")
        tensor = tensor.float()
        if name == "t_embed.mlp.0.weight":
            tensor = time_fold(tensor, freqs.to(tensor.device))
        elif name.startswith("head.out."):
            tensor = -tensor
        out[name] = tensor
        mapping[name] = sources
    used = {s for sources in mapping.values() for s in sources}
    extra = sorted(set(released) - used)
    if extra:
        raise ReleasedCheckpointError(f"unexpected tensors in the released checkpoint that the configured model has no place for: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return out, mapping


def map_projector(projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released REPA projector (Linear, SiLU, Linear, SiLU, Linear) as `repa_projector.*`,
    the names of our projector's Sequential; hidden states are the same in both conventions."""
    return {f"repa_projector.{k}": v.float() for k, v in projector.items()}


# --------------------------------------------------------------------------------------------
# The tool
# --------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def import_checkpoint(ckpt: str, model_cfg, out: str, weights: str = "ema", say: Callable[[str], None] = print) -> dict:
    """Read, map, check and write; -> a summary of what was written."""
    from dip_scale.models.export import write_model_file

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        local = ckpt
        if storage.is_s3(ckpt):
            local = os.path.join(tmp, os.path.basename(ckpt))
            say(f"fetching {ckpt}")
            storage.download_file(ckpt, local)
        elif not os.path.isfile(ckpt):
            raise ReleasedCheckpointError(f"checkpoint not found: {ckpt}")
        say(f"reading {ckpt} ({os.path.getsize(local) / 2**30:.2f} GiB)")
        tensors = read_checkpoint(local)
        released, projector, prefix = select_weights(tensors, weights, ckpt)
        state, mapping = map_released(released, model_cfg)
        aux = map_projector(projector)
        say(f"mapped {len(state)} tensors ({sum(v.numel() for v in state.values()):,} parameters) from {prefix or 'the bare state dict'}*"
            + (f", REPA projector ({len(projector)} tensors)" if projector else ""))
        digest = _sha256(local)
        write_model_file(out, state, model_cfg, aux=aux, source=ckpt, source_sha256=digest, source_weights=prefix.rstrip(".") or "bare",
                         converted_from="released DiP: t -> 1 - t folded into t_embed.mlp.0.weight, output sign into head.out",
                         mapping=json.dumps(mapping, separators=(",", ":")))
    summary = {"out": out, "source": ckpt, "source_sha256": digest, "weights": prefix.rstrip(".") or "bare",
               "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
               "repa_projector": bool(projector), "seconds": round(time.time() - t0, 1)}
    say(f"wrote {out} in {summary['seconds']} s")
    return summary
