"""The model file: one safetensors holding weights (e.g. the EMA) plus the model config, so
sampling and evaluation rebuild the exact architecture without the experiment YAML, Composer or
DeepSpeed. Local paths and s3:// both work."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from dip_scale import storage

FORMAT = "dip_scale.model.v1"


def write_model_file(path: str, state_dict: dict[str, torch.Tensor], model_cfg, **meta: str) -> None:
    """Write atomically (tmp + rename locally, single PUT on S3): never a half-written file."""
    metadata = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(model_cfg)), **{k: str(v) for k, v in meta.items()}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        save_file(tensors, local, metadata=metadata)
        storage.upload_file(local, path)


def read_model_file(path: str):
    """-> (DiP in eval mode with the stored weights, ModelConfig, metadata dict)."""
    from safetensors import safe_open

    from dip_scale.models import build_model
    from dip_scale.models.spec import ModelConfig
    from dip_scale.schema import build_section

    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if storage.is_s3(path):
            local = os.path.join(tmp, "model.safetensors")
            storage.download_file(path, local)
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        with safe_open(local, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dip_scale model file (format {meta.get('format')!r}, expected {FORMAT!r})")
        model_cfg = build_section(ModelConfig, json.loads(meta["model_config"]), "model.")
        model = build_model(model_cfg)
        model.load_state_dict(load_file(local), strict=True)
    return model.eval(), model_cfg, meta
