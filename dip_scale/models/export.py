"""The model file: one safetensors holding weights (e.g. the EMA) plus the model config, so
sampling and evaluation rebuild the exact architecture without the experiment YAML, Composer or
DeepSpeed. Local paths and s3:// both work.

Tensors named `aux.<part>.*` travel with the model without being part of it: an imported
released checkpoint keeps its REPA projector as `aux.repa_projector.*`, which a fine-tuning
run (`trainer.init_from`) loads and sampling ignores."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile

from dip_scale import storage

FORMAT = "dip_scale.model.v1"
AUX = "aux."


def write_model_file(path: str, state_dict: dict, model_cfg, aux: dict | None = None, **meta: str) -> None:
    """Write atomically (tmp + rename locally, single PUT on S3): never a half-written file."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(model_cfg)), **{k: str(v) for k, v in meta.items()}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tensors.update({AUX + k: v.detach().to("cpu").contiguous() for k, v in (aux or {}).items()})
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        save_file(tensors, local, metadata=metadata)
        storage.upload_file(local, path)


def load_model_file(path: str):
    """-> (model state dict, aux tensors by `<part>.<name>`, ModelConfig, metadata), without
    building the model."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from dip_scale.models.spec import ModelConfig
    from dip_scale.schema import build_section

    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if storage.is_s3(path):
            local = os.path.join(tmp, "model.safetensors")
            storage.download_file(path, local)
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            with safe_open(local, framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a dip_scale model file (format {meta.get('format')!r}, expected {FORMAT!r})")
            tensors = load_file(local)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable model file ({e}); a truncated or partial copy?") from None
    model_cfg = build_section(ModelConfig, json.loads(meta["model_config"]), "model.")
    weights = {k: v for k, v in tensors.items() if not k.startswith(AUX)}
    aux = {k[len(AUX):]: v for k, v in tensors.items() if k.startswith(AUX)}
    return weights, aux, model_cfg, meta


def read_model_file(path: str):
    """-> (DiP in eval mode with the stored weights, ModelConfig, metadata dict)."""
    from dip_scale.models import build_model

    weights, _, model_cfg, meta = load_model_file(path)
    model = build_model(model_cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval(), model_cfg, meta


def read_model_header(path: str):
    """-> (ModelConfig, metadata) of a local model file from its safetensors header alone: no
    torch, no tensor read, so a training run checks `trainer.init_from` in its first second."""
    from dip_scale.models.spec import ModelConfig
    from dip_scale.schema import build_section

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
    except (OSError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dip_scale model file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return build_section(ModelConfig, json.loads(meta["model_config"]), "model."), meta
