"""Fast checks of the training pieces that need no launcher: the DeepSpeed section's validation,
the model file (EMA export) round trip, and tools/sample.py on it."""
from __future__ import annotations

import subprocess

import pytest
import torch
from PIL import Image

from conftest import PYTHON, ROOT, env_with_repo_on_path, tiny_config
from dip_scale.config import load_config
from dip_scale.models import build_model
from dip_scale.models.export import read_model_file, write_model_file
from dip_scale.training.deepspeed import precision_for, validate_deepspeed


@pytest.mark.parametrize(
    "ds, on_gpu, expected",
    [
        ({"zero_optimisation": {"stage": 2}}, True, "unknown key 'deepspeed.zero_optimisation' (did you mean 'zero_optimization'?)"),
        ({"zero_optimization": {"stagee": 2}}, True, "deepspeed.zero_optimization.stagee: Extra inputs are not permitted"),
        ({"zero_optimization": {"stage": 5}}, True, "deepspeed.zero_optimization.stage"),
        ({"train_batch_size": 256}, True, "deepspeed.train_batch_size: not set here: set data.batch_size"),
        ({"optimizer": {"type": "Adam"}}, True, "deepspeed.optimizer: not set here"),
        ({"gradient_clipping": "abc"}, True, "deepspeed.gradient_clipping: expected a number"),
        ({"bf16": {"enabled": True}}, False, "deepspeed.bf16.enabled: needs a GPU"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, True, "round_robin_gradients: not supported"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, True, "zero_force_ds_cpu_optimizer: false"),
    ],
)
def test_bad_deepspeed_sections_are_named(ds, on_gpu, expected):
    problems = validate_deepspeed(ds, on_gpu=on_gpu)
    assert any(expected in p for p in problems), problems


def test_good_deepspeed_sections_pass_and_set_precision():
    paper = load_config(str(ROOT / "yamls" / "dip_xl16_600ep.yaml"), ["objective.repa.enabled=false"]).deepspeed
    assert validate_deepspeed(paper, on_gpu=True) == [] and precision_for(paper) == "amp_bf16"
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False,
               "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "gradient_clipping": 1.0}
    assert validate_deepspeed(offload, on_gpu=True) == [] and precision_for(offload) == "fp32"
    assert validate_deepspeed({"zero_optimization": {"stage": 1}}, on_gpu=False) == []


@pytest.mark.slow
def test_train_entry_rejects_a_bad_deepspeed_key_before_training(tmp_path):
    proc = subprocess.run(
        [PYTHON, str(ROOT / "dip_scale" / "train.py"), str(ROOT / "yamls" / "dip_tiny_cpu.yaml"),
         "deepspeed.zero_optimisation.stage=3", f"run_dir={tmp_path / 'run'}", "eval.backend=none"],  # no demo files needed
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300,
    )
    assert proc.returncode == 2
    assert "deepspeed.zero_optimisation" in proc.stderr and "did you mean 'zero_optimization'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def _tiny_model():
    cfg = tiny_config(**{"model.num_classes": 3})
    torch.manual_seed(0)
    return cfg.model, build_model(cfg.model)


def test_model_file_round_trip_local_and_s3(tmp_path, s3):
    model_cfg, model = _tiny_model()
    for path in (str(tmp_path / "m.safetensors"), f"{s3['url']}/ema/m.safetensors"):
        write_model_file(path, model.state_dict(), model_cfg, step=7)
        loaded, cfg2, meta = read_model_file(path)
        assert cfg2 == model_cfg and meta["step"] == "7"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a dip_scale model file"):
        read_model_file(str(tmp_path / "foreign.safetensors"))


@pytest.mark.slow
def test_sample_tool_draws_a_grid_from_a_model_file(tmp_path):
    model_cfg, model = _tiny_model()
    path = tmp_path / "ema.safetensors"
    write_model_file(str(path), model.state_dict(), model_cfg)
    out = tmp_path / "grid.png"
    proc = subprocess.run([PYTHON, str(ROOT / "tools" / "sample.py"), str(path), "--classes", "0,2", "--per-class", "2",
                           "--steps", "3", "--out", str(out)], capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.width >= 2 * 32 and im.height >= 2 * 32
    bad = subprocess.run([PYTHON, str(ROOT / "tools" / "sample.py"), str(path), "--classes", "9"], capture_output=True, text=True,
                         env=env_with_repo_on_path(), timeout=300)
    assert bad.returncode == 2 and "outside 0..2" in bad.stderr
