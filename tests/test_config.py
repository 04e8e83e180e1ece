"""The experiment config: every documented key round-trips, bad input fails early and clearly."""
from __future__ import annotations

import dataclasses
import subprocess
import typing

import pytest
import yaml

from conftest import PYTHON, ROOT, env_with_repo_on_path
from dip_scale.config import ConfigError, ExperimentConfig, load_config, to_yaml

YAMLS = sorted((ROOT / "yamls").glob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_loads_and_round_trips(path, tmp_path):
    cfg = load_config(str(path))
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(str(dumped)) == cfg


def _schema_paths(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_paths(hints[f.name], prefix + f.name + ".")


def test_reference_yaml_documents_every_key():
    raw = yaml.safe_load((ROOT / "yamls" / "dip_xl16_600ep.yaml").read_text())
    missing = []
    for key in _schema_paths(ExperimentConfig):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"keys of the schema not documented in dip_xl16_600ep.yaml: {missing}"


def test_defaults_match_the_paper():
    cfg = load_config(None)
    assert (cfg.model.preset, cfg.model.head.type, cfg.model.head.placement) == ("XL/16", "conv_unet", "post_hoc")
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.0
    assert cfg.ema.decay == 0.9999 and cfg.data.batch_size == 256
    assert (cfg.sampler.method, cfg.sampler.steps, cfg.sampler.cfg_scale) == ("euler", 100, 2.9)
    assert cfg.resolved_run_dir == "runs/dip"


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "model.head.placement=hybrid",
            "optimizer.lr=3e-4",  # PyYAML alone would read this as a string
            "deepspeed.zero_optimization.stage=3",
            "deepspeed.gradient_clipping=1.0",
            "sampler.cfg_interval=[0.1, 0.9]",
            "trainer.save_folder=s3://bucket/run",
            "logging.peak_flops=null",
        ],
    )
    assert cfg.model.head.placement == "hybrid"
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3 and cfg.deepspeed["gradient_clipping"] == 1.0
    assert cfg.deepspeed["bf16"] == {"enabled": True}  # untouched siblings survive
    assert cfg.sampler.cfg_interval == [0.1, 0.9]
    assert cfg.trainer.save_folder == "s3://bucket/run" and cfg.logging.peak_flops is None


def test_base_inheritance_merges_deeply():
    cfg = load_config(str(ROOT / "yamls" / "ablation_placement_hybrid.yaml"), ["objective.repa.enabled=false"])
    assert cfg.model.head.placement == "hybrid" and cfg.model.head.type == "conv_unet"
    assert cfg.trainer.max_duration == "160ep"  # from dip_xl16_160ep.yaml
    assert cfg.model.head.channels == [64, 128, 256, 512]  # from dip_xl16_600ep.yaml


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.hed.type=mlp"], ["unknown key 'model.hed'", "did you mean 'head'"]),
        (["model.head.type=conv_unett"], ["model.head.type", "valid choices: conv_unet, mlp, coord_mlp, patch_attention, none", "did you mean 'conv_unet'"]),
        (["model.head.placement=posthoc"], ["model.head.placement", "post_hoc, intermediate, hybrid", "did you mean 'post_hoc'"]),
        (["model.preset=XL/17"], ["model.preset", "valid choices", "XL/16"]),
        (["data.batch_size=abc"], ["data.batch_size: expected an integer, got 'abc'"]),
        (["data.batch_size=2.5"], ["data.batch_size: expected an integer"]),
        (["data.hflip=maybe"], ["data.hflip: expected true or false"]),
        (["optimizer.lr=fast"], ["optimizer.lr: expected a number"]),
        (["optimizer.betas=0.9"], ["optimizer.betas: expected a list of float"]),
        (["trainer.max_duration=600"], ["trainer.max_duration: expected a string"]),
        (["trainer.max_duration=600epochs"], ["trainer.max_duration", "not a Composer time string"]),
        (["model.head.type=none", "model.head.placement=hybrid"], ["model.head.placement", "needs a detailer head"]),
        (["model.head.placement=intermediate", "model.head.inject_after=26"], ["model.head.inject_after: must be in 1..25"]),
        (["model.head.channels=[8,16,32,64,128]"], ["model.head.channels", "divisible by 32"]),
        (["model.image_size=250"], ["model.image_size", "multiple of the patch size 16"]),
        (["objective.repa.enabled=true"], ["objective.repa.weights", "no encoder weights file"]),
        (["eval.backend=local"], ["eval.backend: 'local' evaluates the EMA files exported under trainer.save_folder",
                                  "eval.inception_weights: needed", "eval.reference_stats: needed"]),
        (["eval.backend=k8s"], ["eval.backend", "valid choices: none, local, kubernetes"]),
        (["eval.backend=local", "trainer.save_folder=ck", "eval.inception_weights=/w/inception.pt", "eval.reference_stats=r.npz"],
         ["eval.inception_weights: clean-fid loads a file named inception-2015-12-05.pt"]),
        (["eval.feature_mode=legacy_pytorch"], ["eval.feature_mode", "legacy_tensorflow, clean"]),
        (["eval.num_samples=1"], ["eval.num_samples: must be >= 2"]),
        (["eval.kubernetes.gpu=1"], ["unknown key 'eval.kubernetes.gpu'", "did you mean 'gpus'"]),
        (["ema.decay=1.5"], ["ema.decay: must be in (0, 1)"]),
        (["sampler.cfg_interval=[0.9, 0.1]"], ["sampler.cfg_interval"]),
        (["logging.sample_classes=[5000]"], ["logging.sample_classes", "0..999"]),
        (["run_name=my run"], ["run_name"]),
        (["data.batch_size"], ["not of the form key.path=value"]),
        # zero and nonsense intervals and durations (issue: they trained silently or failed late)
        (["trainer.save_interval=0ba"], ["trainer.save_interval: '0ba' must be greater than zero"]),
        (["logging.metrics_interval=0ba"], ["logging.metrics_interval: '0ba' must be greater than zero"]),
        (["trainer.max_duration=0ba"], ["trainer.max_duration: '0ba' must be greater than zero"]),
        (["trainer.max_duration=0.5dur"], ["trainer.max_duration", "relative to itself"]),
        (["deepspeed.zero_optimization.stage=4"], ["deepspeed.zero_optimization.stage: 4 is not a valid choice; valid choices: 0, 1, 2, 3"]),
        (["deepspeed={}"], ["deepspeed: the section is empty"]),
        (["trainer.autoresume=true"], ["trainer.autoresume: true needs trainer.save_folder"]),
    ],
)
def test_bad_values_name_the_key_and_the_choices(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for text in expected:
        assert text in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.head.type=cnn", "data.batch_size=x", "optimiser.lr=1"])
    msg = str(err.value)
    assert "model.head.type" in msg and "data.batch_size" in msg and "did you mean 'optimizer'" in msg


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("model: {preset: XL/16\n")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="chain loops"):
        load_config(str(tmp_path / "loop.yaml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_train_entry_requires_the_runs_local_files_but_summaries_do_not(tmp_path):
    """Weights a run reads (REPA encoder, Inception, reference statistics) are checked by the
    training entry before anything starts; printing or summarising a config needs none of them."""
    args = ["objective.repa.enabled=true", "objective.repa.align_block=2", "objective.repa.weights=/nope/dinov2.pth", "eval.backend=local",
            f"trainer.save_folder={tmp_path}/ck", "eval.inception_weights=/nope/inception-2015-12-05.pt",
            f"eval.reference_stats={tmp_path}/ref.npz"]
    proc = subprocess.run([PYTHON, str(ROOT / "dip_scale" / "train.py"), str(ROOT / "yamls" / "dip_tiny_cpu.yaml"), *args],
                          capture_output=True, text=True, env=env_with_repo_on_path(), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for text in ("objective.repa.weights: file not found: /nope/dinov2.pth",
                 "eval.inception_weights: file not found: /nope/inception-2015-12-05.pt", f"eval.reference_stats: file not found: {tmp_path}/ref.npz"):
        assert text in proc.stderr
    summary = subprocess.run([PYTHON, str(ROOT / "tools" / "model_summary.py"), str(ROOT / "yamls" / "dip_xl16_600ep.yaml")],
                             capture_output=True, text=True, env=env_with_repo_on_path(), timeout=120)
    assert summary.returncode == 0, summary.stderr


@pytest.mark.parametrize("override", ["deepspeed.zero_optimization.stage=4", "trainer.save_interval=0ba"])
def test_train_entry_refuses_nonsense_settings_before_any_heavy_import(override):
    probe = subprocess.run(
        [PYTHON, "-c", "import sys, time; t = time.time(); from dip_scale.train import main; rc = main(sys.argv[1:]); "
         "print('torch' in sys.modules, 'deepspeed' in sys.modules, rc, round(time.time() - t, 1))",
         str(ROOT / "yamls" / "dip_tiny_cpu.yaml"), override],
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=120,
    )
    torch_loaded, ds_loaded, rc, seconds = probe.stdout.split()
    assert (torch_loaded, ds_loaded, rc) == ("False", "False", "2"), probe.stderr
    assert override.split("=")[0] in probe.stderr and float(seconds) < 5


def test_train_entry_rejects_a_bad_yaml_without_traceback_or_heavy_imports(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  head:\n    type: unet\n    placment: hybrid\n")
    proc = subprocess.run(
        [PYTHON, str(ROOT / "dip_scale" / "train.py"), str(bad)],
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.head.type" in proc.stderr and "'unet'" in proc.stderr and "did you mean 'conv_unet'" in proc.stderr
    assert "model.head.placment" in proc.stderr and "did you mean 'placement'" in proc.stderr
    # validation happens before torch (and everything heavy) is imported
    probe = subprocess.run(
        [PYTHON, "-c", "import sys; from dip_scale.train import main; rc = main([sys.argv[1]]); "
         "print('torch' in sys.modules, 'composer' in sys.modules, rc)", str(bad)],
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=120,
    )
    assert probe.stdout.split() == ["False", "False", "2"], probe.stderr
