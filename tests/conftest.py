"""Shared fixtures: the repository root, the venv's python, and tiny model configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the venv interpreter running pytest


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def fake_dinov2_weights(tmp_path) -> str:
    """A tiny DINOv2 checkpoint in the official layout, so YAMLs with REPA enabled validate."""
    import torch

    from dip_scale.diffusion.repa import DINOv2

    vit = DINOv2(dim=64, depth=2, num_heads=1, patch=14, pos_grid=4, mlp_hidden=128)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(vit.state_dict(), path)
    return str(path)


def env_with_repo_on_path() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
