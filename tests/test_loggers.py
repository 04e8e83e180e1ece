"""Operations: Composer's loggers and callbacks from the YAML (read back through each library's
own reader), and the run mirror that lets metrics.jsonl and the sample grids survive a restart on
an empty disk (docs/operations.md)."""
from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import PYTHON, env_with_repo_on_path
from dip_scale import naming
from dip_scale.config import (
    CallbacksConfig, ConfigError, LoggersConfig, UNSUPPORTED_CALLBACKS, load_config, run_upload_location,
)


# --------------------------------------------------------------------------------------------
# The sections: validated like every other, before torch, under Composer's own names
# --------------------------------------------------------------------------------------------
def test_unknown_logger_callback_or_key_is_a_did_you_mean_before_torch_is_imported():
    code = (
        "import sys\n"
        "from dip_scale.config import load_config, ConfigError\n"
        "try:\n"
        "    load_config(None, ['loggers.wandbb={}', 'loggers.mlflow.tracking_ur=file:/x', 'callbacks.lr_monitr={}',\n"
        "                       'callbacks.optimizer_monitor={}'])\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "try:\n"
        "    load_config(None, ['loggers.remote_uploader.bucket_uri=s3://b/prefix'])\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env_with_repo_on_path(), timeout=60).stdout
    assert "unknown key 'loggers.wandbb' (did you mean 'wandb'?)" in out
    assert "unknown key 'loggers.mlflow.tracking_ur' (did you mean 'tracking_uri'?)" in out
    assert "unknown key 'callbacks.lr_monitr' (did you mean 'lr_monitor'?)" in out
    assert "callbacks.optimizer_monitor: not selectable: Composer 0.27 refuses it under DeepSpeed" in out
    assert "loggers.remote_uploader.bucket_uri: expected the bucket only" in out
    assert out.strip().endswith("torch not imported")


def test_sections_carry_composer_names_and_defaults():
    """Every key of a section is an argument of Composer 0.27's class with Composer's default,
    except the few documented ones (wandb.init's mode/dir, dip_scale's run_dir-relative paths)."""
    from composer import callbacks, loggers

    ours = {"wandb": {"mode", "dir"}}
    changed = {("tensorboard", "log_dir"), ("file", "filename"), ("mlflow", "resume"), ("speed_monitor", "window_size"),
               ("speed_monitor", "gpu_flops_available")}
    classes = {"tensorboard": loggers.TensorboardLogger, "mlflow": loggers.MLFlowLogger, "wandb": loggers.WandBLogger,
               "file": loggers.FileLogger, "console": loggers.ConsoleLogger, "remote_uploader": loggers.RemoteUploaderDownloader,
               "lr_monitor": callbacks.LRMonitor, "speed_monitor": callbacks.SpeedMonitor, "runtime_estimator": callbacks.RuntimeEstimator,
               "memory_monitor": callbacks.MemoryMonitor, "system_metrics_monitor": callbacks.SystemMetricsMonitor,
               "memory_snapshot": callbacks.MemorySnapshot, "oom_observer": callbacks.OOMObserver}
    sections = {f.name: f for f in dataclasses.fields(LoggersConfig) + dataclasses.fields(CallbacksConfig)}
    assert sections.keys() == classes.keys()
    import typing

    for name, cls in classes.items():
        params = inspect.signature(cls.__init__).parameters
        section_cls = [a for a in typing.get_args(typing.get_type_hints(LoggersConfig if name in {f.name for f in dataclasses.fields(LoggersConfig)} else CallbacksConfig)[name]) if a is not type(None)][0]
        for f in dataclasses.fields(section_cls):
            if f.name in ours.get(name, ()):
                continue
            assert f.name in params, f"{name}.{f.name} is not an argument of {cls.__name__}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if (name, f.name) not in changed and params[f.name].default is not inspect.Parameter.empty and f.name != "stream":
                assert default == params[f.name].default, (name, f.name, default, params[f.name].default)
    assert "optimizer_monitor" in UNSUPPORTED_CALLBACKS and not set(UNSUPPORTED_CALLBACKS) & set(classes)


def test_run_upload_location():
    s3 = load_config(None, ["trainer.save_folder=s3://bkt/runs/{run_name}/checkpoints", "run_name=r1"])
    assert run_upload_location(s3) == "s3://bkt/runs/r1/run"
    assert run_upload_location(load_config(None, ["trainer.save_folder=s3://bkt/runs/{run_name}", "run_name=r1"])) == "s3://bkt/runs/run/r1"
    assert run_upload_location(load_config(None, ["trainer.save_folder=s3://bkt"])) == "s3://bkt/run/dip"
    assert run_upload_location(load_config(None, ["trainer.save_folder=/data/ckpt"])) is None  # run_dir is local already
    assert run_upload_location(load_config(None, ["trainer.save_folder=s3://b/x", "logging.run_mirror=false"])) is None
    with pytest.raises(ConfigError, match="overlaps run_dir"):
        load_config(None, ["run_dir=/tmp/r", "logging.run_upload=/tmp/r/mirror"])


# --------------------------------------------------------------------------------------------
# The run mirror, in process (local folders; the launcher test below runs it on S3)
# --------------------------------------------------------------------------------------------
def _state(step: int):
    return SimpleNamespace(timestamp=SimpleNamespace(batch=SimpleNamespace(value=step)))


def _write_rows(run_dir: Path, steps, tag: str = "a"):
    with open(run_dir / "metrics.jsonl", "a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": s * 0.1, "tag": tag}) + "\n")


def _grids(folder: Path) -> list[int]:
    return sorted(naming.parse_grid(n) for n in os.listdir(folder))


def _grid(run_dir: Path, step: int, content: bytes = b"png"):
    (run_dir / naming.SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    (run_dir / naming.grid(step)).write_bytes(content + str(step).encode())


def test_mirror_parts_restore_on_an_empty_disk_and_drop_the_discarded_future(tmp_path):
    from dip_scale.training.mirror import RunMirror, merge_parts

    remote, run = tmp_path / "mirror", tmp_path / "pod1" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: t\n")
    m = RunMirror(str(run), str(remote), "t", interval_s=3600)
    m.restore(0)
    m.fit_start(_state(0), None)
    for step in range(1, 26):  # checkpoints at 10 and 20, killed at 25 (after a periodic sync at 23)
        _write_rows(run, [step])
        if step % 5 == 0:
            _grid(run, step)
        if step % 10 == 0:
            m.checkpoint(_state(step))
        if step == 23:
            m.sync(wait=True)
    parts = sorted(p.name for p in (remote / "metrics").iterdir())
    assert parts == ["000000000000.jsonl", "000000000010.jsonl", "000000000020.jsonl"]
    assert [r["step"] for r in merge_parts({0: (remote / "metrics" / parts[0]).read_bytes()})] == list(range(1, 11))
    assert (remote / "config.yaml").exists() and _grids(remote / "samples") == [5, 10, 15, 20]

    # a new pod, an empty disk, resume from the checkpoint at 20
    run2 = tmp_path / "pod2" / "run"
    m2 = RunMirror(str(run2), str(remote), "t", interval_s=3600)
    m2.restore(20)
    assert [r["step"] for r in merge_parts({0: (run2 / "metrics.jsonl").read_bytes()})] == list(range(1, 21))
    assert _grids(run2 / "samples") == [5, 10, 15, 20]
    assert not (remote / "metrics" / "000000000020.jsonl").exists()  # 21..23 belonged to the discarded future
    m2.fit_start(_state(20), None)
    for step in range(21, 31):
        _write_rows(run2, [step], tag="b")
        if step % 5 == 0:
            _grid(run2, step)
        if step % 10 == 0:
            m2.checkpoint(_state(step))
    m2.finish()
    merged = merge_parts({int(p.stem): p.read_bytes() for p in (remote / "metrics").iterdir()})
    assert [r["step"] for r in merged] == list(range(1, 31))  # one run: nothing duplicated, nothing lost
    assert [r["tag"] for r in merged] == ["a"] * 20 + ["b"] * 10
    assert _grids(remote / "samples") == _grids(run2 / "samples") == [5, 10, 15, 20, 25, 30]

    # the same disk restarted from 10 (a damaged checkpoint at 20 was passed over): lines and grids after 10 go
    m3 = RunMirror(str(run2), str(remote), "t", interval_s=3600)
    m3.restore(10)
    assert [r["step"] for r in merge_parts({0: (run2 / "metrics.jsonl").read_bytes()})] == list(range(1, 11))
    assert _grids(run2 / "samples") == _grids(remote / "samples") == [5, 10]
    assert sorted(p.name for p in (remote / "metrics").iterdir()) == ["000000000000.jsonl"]

    # another run's mirror is refused
    with pytest.raises(ConfigError, match="holds the files of run 't'"):
        RunMirror(str(tmp_path / "pod3"), str(remote), "other").restore(0)


# --------------------------------------------------------------------------------------------
# Under the real launcher
# --------------------------------------------------------------------------------------------
def _tensorboard(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in tags["scalars"]}
    images = {t: [(e.step, e.encoded_image_string) for e in ea.Images(t)] for t in tags["images"]}
    hparams = {}
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams.update({k: v.string_value or v.number_value or v.bool_value for k, v in data.session_start_info.hparams.items()})
    return {"scalars": scalars, "images": images, "hparams": hparams}


def _mlflow(tracking_uri: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    return {"metrics": history, "params": run.data.params, "images": images, "status": run.info.status,
            "artifact_dir": client.download_artifacts(run.info.run_id, "images")}


def _wandb(wandb_dir: Path) -> dict:
    """The offline run's own record log (run-<id>.wandb), read with wandb's DataStore and its
    protobuf Record: every history row, the config, and the media files it names."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    (run_dir,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    store = DataStore()
    store.open_for_scan(log)
    rows, config, metrics = [], {}, {}
    while (data := store.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "metric":  # wandb.define_metric
            metrics[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
    return {"rows": rows, "config": config, "metrics": metrics, "run_dir": run_dir}


@pytest.mark.slow
def test_loggers_from_yaml_receive_losses_throughput_grids_and_config(tiny_mds, tmp_path):
    from training_helpers import run, tiny_overrides

    store = tmp_path / "mlruns"
    run(tiny_overrides(tiny_mds, tmp_path / "run", str(tmp_path / "ckpt"), **{
        "trainer.max_duration": "12ba", "trainer.save_interval": "6ba", "logging.sample_interval": "6ba", "logging.peak_flops": 1e12,
        "loggers.tensorboard": "{}", "loggers.mlflow.tracking_uri": f"file:{store}", "loggers.wandb.mode": "offline",
        "callbacks.lr_monitor": "{}", "callbacks.runtime_estimator": "{}", "callbacks.speed_monitor.window_size": 3,
        "callbacks.system_metrics_monitor": "{}",
    }), cwd=tmp_path)
    _check_loggers(tmp_path)


def _same_image(data: bytes, reference: Path) -> bool:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img, Image.open(reference) as ref:
        return img.size == ref.size and img.convert("RGB").tobytes() == ref.convert("RGB").tobytes()


def _check_loggers(tmp_path: Path) -> None:
    from training_helpers import losses

    store = tmp_path / "mlruns"
    loss = losses(tmp_path / "run")
    assert sorted(loss) == list(range(1, 13))
    # Composer logs the k-th batch's loss during the batch, at step k - 1 (metrics.jsonl: k completed batches)
    composer_loss = {s - 1: v for s, v in loss.items()}

    tb = _tensorboard(tmp_path / "run" / "tensorboard" / "t")
    assert tb["scalars"]["loss/train/total"] == pytest.approx(composer_loss, rel=1e-6)
    assert set(tb["scalars"]["throughput/images_per_sec"]) == set(range(2, 13))  # from metrics.jsonl's img/s
    assert tb["scalars"]["throughput/samples_per_sec"] and tb["scalars"]["throughput/device/mfu"]  # SpeedMonitor, MFU
    assert set(tb["scalars"]["lr"]) == set(range(1, 13)) and any(t.startswith("lr-") for t in tb["scalars"])  # + LRMonitor
    assert "time/remaining_estimate" in tb["scalars"] and any(t.startswith("cpu_percentage") or "memory" in t for t in tb["scalars"])
    assert [s for s, _ in tb["images"]["samples/ema"]] == [6, 12]
    assert all(_same_image(png, tmp_path / "run" / naming.grid(s)) for s, png in tb["images"]["samples/ema"])
    assert tb["hparams"]["model.preset"] == "tiny/16" and tb["hparams"]["run_name"] == "t"

    ml = _mlflow(f"file:{store}")
    assert ml["status"] == "FINISHED"
    assert ml["metrics"]["loss/train/total"] == pytest.approx({s: composer_loss[s] for s in ml["metrics"]["loss/train/total"]}, rel=1e-6)
    assert len(ml["metrics"]["loss/train/total"]) >= 10  # (MLflow's logger skips a value equal to the last one)
    assert ml["metrics"]["throughput/images_per_sec"] and ml["metrics"]["throughput/device/mfu"]
    assert ml["params"]["model.preset"] == "tiny/16" and ml["params"]["trainer.max_duration"] == "12ba"
    pngs = {int(p.split("%step%")[1].split("%")[0]): p for p in ml["images"] if p.endswith(".png") and "%step%" in p}
    assert sorted(pngs) == [6, 12], ml["images"]
    for step, path in pngs.items():
        data = Path(ml["artifact_dir"], os.path.basename(path)).read_bytes()
        assert _same_image(data, tmp_path / "run" / naming.grid(step))

    wb = _wandb(tmp_path / "run")
    by_step = {}
    for row in wb["rows"]:
        by_step.setdefault(row["_step"], {}).update(row)
    assert {s: r["loss/train/total"] for s, r in by_step.items() if "loss/train/total" in r} == pytest.approx(composer_loss, rel=1e-6)
    assert any("throughput/images_per_sec" in r for r in by_step.values())
    assert any("throughput/device/mfu" in r for r in by_step.values())
    image_steps = sorted(s for s, r in by_step.items() if "samples/ema/filenames" in r)  # (a dict value: nested keys)
    assert image_steps == [6, 12]
    for step in image_steps:
        (name,) = by_step[step]["samples/ema/filenames"]
        assert _same_image(Path(wb["run_dir"], "files", name).read_bytes(), tmp_path / "run" / naming.grid(step))
    assert wb["config"]["model.preset"] == "tiny/16" and wb["config"]["trainer.max_duration"] == "12ba"


# --------------------------------------------------------------------------------------------
# The two subclasses' reasons, in process (no launcher)
# --------------------------------------------------------------------------------------------
def test_wandb_keeps_eval_results_that_arrive_after_their_step(tmp_path):
    """An FID result is logged at its checkpoint's step when it arrives, steps later; W&B drops
    any step that goes back, so it gets its own x-axis (eval/step)."""
    from dip_scale.training.loggers import WandBLogger

    wb_logger = WandBLogger(init_kwargs={"mode": "offline", "dir": str(tmp_path)})
    wb_logger.init(SimpleNamespace(run_name="t"), None)
    for step in range(1, 6):
        wb_logger.log_metrics({"loss/train/total": 1.0 / step}, step=step)
    wb_logger.log_metrics({"eval/fid": 42.0, "eval/sfid": 7.0}, step=2)  # the checkpoint at 2, evaluated by step 5
    wb_logger.log_metrics({"loss/train/total": 0.1}, step=6)
    wb_logger.post_close()
    import wandb

    wandb.teardown()  # in process: wait for wandb's service to write the run file (a training process does at exit)
    wb = _wandb(tmp_path)
    (row,) = [r for r in wb["rows"] if "eval/fid" in r]
    assert (row["eval/fid"], row["eval/sfid"], row["eval/step"]) == (42.0, 7.0, 2)
    assert sorted(r["_step"] for r in wb["rows"] if "loss/train/total" in r) == [1, 2, 3, 4, 5, 6]
    assert wb["metrics"].get("eval/*") == "eval/step"


def test_mlflow_resumed_run_survives_a_changed_parameter(tmp_path):
    """resume: true continues the MLflow run of the same run_name; a parameter whose value
    changed (a longer max_duration) keeps its first value instead of failing training."""
    from mlflow import MlflowClient

    from dip_scale.training.loggers import MLFlowLogger

    uri = f"file:{tmp_path / 'mlruns'}"
    for step, max_duration in ((1, "10ba"), (2, "20ba")):
        ml_logger = MLFlowLogger(tracking_uri=uri, log_system_metrics=False, synchronous=True, resume=True)  # (the section's default)
        ml_logger.init(SimpleNamespace(run_name="t"), None)
        ml_logger.log_hyperparameters({"trainer.max_duration": max_duration, "model.preset": "tiny/16"})
        ml_logger.log_metrics({"loss/train/total": 1.0 / step}, step=step)
        ml_logger.post_close()
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["trainer.max_duration"] == "10ba" and run.data.params["model.preset"] == "tiny/16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train/total")] == [1, 2]
