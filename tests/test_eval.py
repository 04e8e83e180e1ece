"""Evaluation: clean-fid features and statistics, the FID job (local files and S3), and its
dispatch at every checkpoint of a real training run (local processes, Kubernetes Jobs)."""
from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, ROOT, env_with_repo_on_path, tiny_config, write_reference
from training_helpers import logs, run, tiny_overrides

from dip_scale import naming, storage
from dip_scale.config import EvalConfig, KubernetesConfig, ModelConfig, SamplerConfig
from dip_scale.eval.features import FeatureStats, load_feature_extractor, load_reference, save_reference, sha256_of


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields (uint8, N x H x W x 3): not constant, not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _fid_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "dip_scale.eval.fid", *args], capture_output=True, text=True,
                          env=env or env_with_repo_on_path(), cwd=ROOT, timeout=300)


def _tiny_model_file(path: str) -> ModelConfig:
    from dip_scale.models import build_model
    from dip_scale.models.export import write_model_file

    cfg = tiny_config().model
    torch.manual_seed(0)
    write_model_file(path, build_model(cfg).state_dict(), cfg, step=7, epoch=1, run_name="unit")
    return cfg


def test_running_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    # Inception pool features are non-negative with means well above their spread: offset by 50 sigma
    feats = rng.normal(size=(300, 2048)) * rng.uniform(0.1, 3, size=2048) + 50 * rng.uniform(1, 3, size=2048)
    a, b = FeatureStats(), FeatureStats()
    a.add(feats[:100])
    a.add(feats[100:170])
    b.add(feats[170:])
    a.merge(b)  # partial sums from several processes add up
    mu, cov = a.mean_cov()
    assert a.n == 300
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_features_equal_clean_fids_own_folder_pipeline(mode, standin_inception, tmp_path):
    """Our in-memory path (uint8 arrays from the sampler) gives the features clean-fid computes
    for the same images saved as PNG files and read by its own loader."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    images = _images(10)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:03d}.png")
    net = InceptionV3W(str(Path(standin_inception).parent), download=False, resize_inside=mode == "legacy_tensorflow").eval()
    theirs = get_folder_features(str(tmp_path), model=net, num_workers=0, batch_size=4, device=torch.device("cpu"), mode=mode, verbose=False)
    ours = load_feature_extractor(standin_inception, mode, torch.device("cpu"))(images)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.std(0).mean() > 0  # the images are told apart


def test_feature_extractor_refuses_other_files(tmp_path):
    other = tmp_path / "inception.pt"
    other.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        load_feature_extractor(str(other), "clean", torch.device("cpu"))


def test_local_backend_queues_reports_failures_and_knows_what_still_runs(tmp_path):
    """max_parallel holds; a restarted run sees which evals still run (pid alive) and which died
    with the old run; a process that cannot be started is reported, not lost in the queue."""
    import os
    import signal

    from dip_scale.eval.dispatch import LocalBackend
    from dip_scale.eval.jobs import EvalJob
    from dip_scale.naming import Step

    slow, quick = EvalJob("ck/ema/ep1-ba10.safetensors", Step(10, 1)), EvalJob("ck/ema/ep2-ba20.safetensors", Step(20, 2))
    backend = LocalBackend(str(tmp_path / "eval"), max_parallel=1)
    backend.submit(slow, ["python", "-c", "import time; time.sleep(60)"])
    backend.submit(quick, ["python", "-c", "print('done')"])
    assert [j for j, *_ in backend.running] == [slow] and [j for j, _ in backend.queue] == [quick]
    restarted = LocalBackend(str(tmp_path / "eval"), max_parallel=1)
    assert restarted.started(slow) and not restarted.started(quick)
    (_, proc, _), = backend.running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not restarted.started(slow)  # killed with the old run: to be dispatched again
    (failed, reason), = backend.poll()  # reported failed with its reason, and the queue moves on
    assert failed == slow and "exit -9" in reason and "ep1-ba10.log" in reason
    (_, proc, _), = backend.running
    proc.wait()
    assert backend.poll() == [] and not backend.busy()
    assert (tmp_path / "eval" / "ep2-ba20.log").read_text().strip() == "done"
    (tmp_path / "not-a-dir").write_text("")
    broken = LocalBackend(str(tmp_path / "not-a-dir"), max_parallel=1)
    broken.submit(quick, ["python", "-c", "pass"])
    (failed, reason), = broken.poll()
    assert failed == quick and "could not start" in reason and not broken.busy()  # reported, not left queued forever
    retried = LocalBackend(str(tmp_path / "eval"), max_parallel=1, max_retries=1)  # a failure is dispatched again once
    retried.submit(quick, ["python", "-c", "import sys; print('boom'); sys.exit(3)"])
    while retried.busy():
        outcome = retried.poll()
        time.sleep(0.2)
    (failed, reason), = outcome
    assert failed == quick and retried.attempts[quick] == 1 and reason.startswith("exit 3: boom")


def test_fid_log_keeps_one_row_per_step_and_survives_a_torn_line(tmp_path):
    from dip_scale.config import ExperimentConfig
    from dip_scale.eval.dispatch import EvalDispatch
    from dip_scale.eval.jobs import EvalJob
    from dip_scale.naming import Step

    cfg = ExperimentConfig()
    cfg.eval.backend, cfg.eval.reference_stats = "local", str(tmp_path / "ref.npz")
    dispatch = EvalDispatch(ema=None, cfg=cfg, run_dir=str(tmp_path))
    (tmp_path / "fid.jsonl").write_text(json.dumps({"step": 10, "fid": 9.0, "result": "a"}) + '\n{"step": 20, "fi')
    job = EvalJob("ck/ema/ep2-ba20.safetensors", Step(20, 2))
    dispatch._record({"fid": 5.0, "sfid": 7.0}, job, None)
    dispatch._record({"fid": 4.0, "sfid": 6.0, "is": 3.0}, job, None)  # the same step evaluated again replaces its row
    swept = EvalJob("ck/ema/ep2-ba20.safetensors", Step(20, 2), cfg_scale=1.0)  # another scale: a row of its own
    dispatch._record_failure(swept, "Job failed: DeadlineExceeded")
    rows = [json.loads(line) for line in (tmp_path / "fid.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("cfg_scale"), r.get("fid")) for r in rows] == [(10, None, 9.0), (20, None, 4.0), (20, 1.0, None)]
    assert rows[1]["is"] == 3.0 and rows[2]["failed"] == "Job failed: DeadlineExceeded" and swept.result.endswith("eval/ep2-ba20-cfg1.json")
    assert (tmp_path / "fid.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_labels_are_balanced_shuffled_and_seeded():
    from dip_scale.eval.fid import eval_labels

    labels = eval_labels(1000, 10, seed=3)
    assert np.bincount(labels).tolist() == [100] * 10
    assert labels != sorted(labels) and labels == eval_labels(1000, 10, seed=3) and labels != eval_labels(1000, 10, seed=4)
    assert np.bincount(eval_labels(1003, 10, 0)).tolist() == [101, 101, 101] + [100] * 7


@pytest.mark.slow
def test_reference_statistics_from_a_converted_split_through_s3(tiny_mds, standin_inception, s3):
    out = f"{s3['url']}/fid/train.npz"
    proc = subprocess.run([PYTHON, str(ROOT / "tools" / "make_fid_stats.py"), "--data", tiny_mds, "--inception", standin_inception,
                           "--out", out, "--feature-mode", "clean", "--batch-size", "16", "--device", "cpu"],
                          capture_output=True, text=True, env=env_with_repo_on_path(**s3["env"]), timeout=300)
    assert proc.returncode == 0, proc.stderr
    mu, sigma, meta = load_reference(out)
    assert meta["num_images"] == 64 and meta["feature_mode"] == "clean" and meta["source"].endswith("/train")
    # the same numbers as features of the decoded shards computed here
    from streaming import StreamingDataset

    from dip_scale.data.imagenet import to_tensor_array

    ds = StreamingDataset(local=f"{tiny_mds}/train", shuffle=False, batch_size=1)
    images = np.stack([to_tensor_array(ds[i]["image"]) for i in range(len(ds))])
    feats = load_feature_extractor(standin_inception, "clean", torch.device("cpu"))(images)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_fid_job_through_s3_matches_clean_fid_on_the_same_samples(standin_inception, s3, tmp_path):
    """The FID job reads the model and reference from S3, writes result + grid to S3, is
    reproducible whatever its process count, and its number equals clean-fid's own folder pipeline + frechet_distance run
    on the same samples saved as PNG files."""
    from cleanfid.fid import frechet_distance, get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    from dip_scale.diffusion.sampler import sample, to_uint8
    from dip_scale.eval.fid import eval_labels
    from dip_scale.models.export import read_model_file

    model_file = f"{s3['url']}/run/checkpoints/ema/ep1-ba7.safetensors"
    _tiny_model_file(model_file)
    reference = write_reference(f"{s3['url']}/fid/ref.npz", standin_inception, _images(40, seed=1))
    env = env_with_repo_on_path(**s3["env"])
    common = ["--reference", reference, "--inception", standin_inception, "--num-samples", "24", "--batch-size", "10",
              "--steps", "3", "--cfg-scale", "2.0", "--feature-mode", "clean", "--seed", "5", "--device", "cpu"]
    proc = _fid_cli(model_file, *common, "--out", f"{s3['url']}/run/checkpoints/eval/ep1-ba7.json",
                    "--grid", f"{s3['url']}/run/checkpoints/eval/ep1-ba7.png", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(storage.read_bytes(f"{s3['url']}/run/checkpoints/eval/ep1-ba7.json"))
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert result["step"] == 7 and result["num_samples"] == 24 and result["feature_mode"] == "clean"
    assert result["sampler"] == {"method": "euler", "steps": 3, "cfg_scale": 2.0, "cfg_interval": [0.03, 0.89]}
    assert len(result["reference"]["sha256"]) == 64 and len(result["inception"]["sha256"]) == 64
    assert storage.read_bytes(f"{s3['url']}/run/checkpoints/eval/ep1-ba7.png")[:4] == b"\x89PNG"
    # the same samples split over two processes (one per GPU on a GPU node): the same FID
    split = _fid_cli(model_file, *common, "--processes", "2", "--out", str(tmp_path / "split.json"), env=env)
    assert split.returncode == 0, split.stderr
    two = json.loads((tmp_path / "split.json").read_text())
    assert two["processes"] == 2 and two["step"] == 7 and two["fid"] == pytest.approx(result["fid"], rel=1e-5)

    model, cfg, _ = read_model_file(model_file)
    labels = eval_labels(24, cfg.num_classes, 5)
    images = to_uint8(sample(model, torch.tensor(labels), list(range(5, 29)), image_size=32, null_class=4, steps=3,
                             cfg_scale=2.0, cfg_interval=(0.03, 0.89))).numpy()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:03d}.png")
    net = InceptionV3W(str(Path(standin_inception).parent), download=False).eval()
    feats = get_folder_features(str(tmp_path), model=net, num_workers=0, device=torch.device("cpu"), mode="clean", verbose=False)
    mu_ref, sigma_ref, _ = load_reference(reference)
    expected = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sigma_ref)
    assert result["fid"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_fid_job_bad_inputs_fail_early_with_the_reason(standin_inception, tmp_path):
    model_file = str(tmp_path / "m.safetensors")
    _tiny_model_file(model_file)
    stats = FeatureStats()
    stats.add(np.random.default_rng(0).normal(size=(4, 2048)))
    own = sha256_of(standin_inception)
    save_reference(str(tmp_path / "ref.npz"), stats, feature_mode="clean", inception_sha256=own, image_size=32)
    args = ["--inception", standin_inception, "--out", str(tmp_path / "r.json"), "--num-samples", "4", "--device", "cpu"]
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "ref.npz"), "--feature-mode", "legacy_tensorflow", *args)
    assert proc.returncode == 2 and "holds 'clean' features" in proc.stderr
    # a reference of another network or resolution is refused with both named; one that records
    # no network (ADM's) only with --foreign-reference, and the result says so
    save_reference(str(tmp_path / "other.npz"), stats, feature_mode="clean", inception_sha256="ab" * 32)
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "other.npz"), "--feature-mode", "clean", *args)
    assert proc.returncode == 2 and "ab" * 32 in proc.stderr and own in proc.stderr and "--foreign-reference" in proc.stderr
    save_reference(str(tmp_path / "big.npz"), stats, feature_mode="clean", inception_sha256=own, image_size=256)
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "big.npz"), "--feature-mode", "clean", *args)
    assert proc.returncode == 2 and "256 px" in proc.stderr and "32 px" in proc.stderr
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048))
    proc = _fid_cli(model_file, "--reference", str(adm), "--feature-mode", "clean", *args)
    assert proc.returncode == 2 and "records no Inception network" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    proc = _fid_cli(model_file, "--reference", str(adm), "--feature-mode", "clean", "--foreign-reference", "--metrics", "fid", *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["reference"]["foreign"] is True
    (tmp_path / "r.json").unlink()
    # files that are not what they claim: one line naming the file, no traceback
    (tmp_path / "text.npz").write_text("mu,sigma\n1,2\n")
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "text.npz"), *args)
    assert proc.returncode == 2 and "text.npz: not an .npz file" in proc.stderr and "allow_pickle" not in proc.stderr
    bad_net = tmp_path / "net" / Path(standin_inception).name
    bad_net.parent.mkdir()
    bad_net.write_bytes(Path(standin_inception).read_bytes()[:1000])
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "ref.npz"), "--feature-mode", "clean",
                    *[str(bad_net) if a == standin_inception else a for a in args])
    assert proc.returncode == 2 and "was built with Inception sha256" in proc.stderr  # caught by its hash first
    proc = _fid_cli(model_file, "--reference", str(adm), "--feature-mode", "clean", "--foreign-reference", "--metrics", "fid",
                    *[str(bad_net) if a == standin_inception else a for a in args])
    assert proc.returncode == 2 and "not a TorchScript Inception network" in proc.stderr and str(bad_net) in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "missing.npz"), *args)
    assert proc.returncode == 2 and "reference statistics not found" in proc.stderr
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    proc = _fid_cli(model_file, "--reference", str(tmp_path / "junk.npz"), *args)
    assert proc.returncode == 2 and "missing mu, sigma" in proc.stderr
    assert not (tmp_path / "r.json").exists() and "Traceback" not in proc.stderr


def _eval_overrides(tiny_mds: str, tmp_path: Path, save_folder: str, reference: str, inception: str, **extra) -> list[str]:
    return tiny_overrides(tiny_mds, tmp_path / "run", save_folder, **{
        "trainer.max_duration": "20ba", "trainer.save_interval": "10ba", "eval.backend": "local",
        "eval.num_samples": 12, "eval.batch_size": 12, "eval.inception_weights": inception, "eval.reference_stats": reference,
        "eval.feature_mode": "clean", "eval.device": "cpu", "eval.wait_at_end": "true",
        # the dispatch is under test here (the metric suite: test_eval_metrics.py); each Fréchet
        # distance is a scipy sqrtm of a ~2k x 2k matrix, ~8 s on 2 cores
        "eval.metrics": "[fid]", **extra})


@pytest.mark.slow
def test_training_dispatches_a_local_fid_job_per_checkpoint(tiny_mds, standin_inception, tmp_path):
    """A run that does not wait leaves its evals running (the queued one included); the run
    resumed later collects their results, evaluates its own new checkpoint and waits for it."""
    reference = write_reference(str(tmp_path / "ref.npz"), standin_inception, _images(32))
    ckpt = tmp_path / "ckpt"
    args = _eval_overrides(tiny_mds, tmp_path, str(ckpt), str(reference), standin_inception)
    run([*args, "eval.wait_at_end=false"], cwd=tmp_path)
    deadline = time.time() + 240
    while len(list((ckpt / "eval").glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(1)
    assert sorted(json.loads(p.read_text())["step"] for p in (ckpt / naming.EVAL_DIR).glob("*.json")) == [10, 20], logs(tmp_path)

    run([*args, "trainer.max_duration=30ba"], cwd=tmp_path, log="resume")
    rows = [json.loads(line) for line in (tmp_path / "run" / "fid.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == [10, 20, 30], logs(tmp_path)
    for r in rows:
        result = json.loads(Path(r["result"]).read_text())
        assert result["step"] == r["step"] and result["fid"] == r["fid"] and result["num_samples"] == 12
        assert Path(result["model_file"]).exists() and Path(r["result"]).with_suffix(".png").exists()
        assert (tmp_path / "run" / "eval" / f"{Path(r['result']).stem}.log").exists()
    assert (tmp_path / "run" / "fid.png").read_bytes()[:4] == b"\x89PNG"


def test_kubernetes_job_manifest_and_idempotent_submit(kube_api, tmp_path, monkeypatch):
    from dip_scale.eval.fid import command
    from dip_scale.eval.jobs import EvalJob
    from dip_scale.eval.kubernetes import KubernetesBackend, job_name
    from dip_scale.naming import Step
    from dip_scale.schema import ConfigError

    ev = EvalConfig(backend="kubernetes", inception_weights="/opt/w/inception-2015-12-05.pt", reference_stats="s3://b/ref.npz",
                    kubernetes=KubernetesConfig(namespace="research", api_server=kube_api["url"], gpus=2))
    job = EvalJob("s3://b/runs/x/checkpoints/ema/ep3-ba1500.safetensors", Step(1500, 3))
    assert job.result == "s3://b/runs/x/checkpoints/eval/ep3-ba1500.json"
    backend = KubernetesBackend(ev.kubernetes, "My_Run.v2", str(tmp_path), 2)
    argv = command(job.model_file, job.result, ev, SamplerConfig())
    backend.submit(job, argv)
    KubernetesBackend(ev.kubernetes, "My_Run.v2", str(tmp_path), 2).submit(job, argv)  # a resumed run dispatching again: 409, not an error
    (name, manifest), = kube_api["jobs"].items()
    assert name.startswith("dip-eval-my-run-v2-ep3-ba1500-") and manifest["metadata"]["namespace"] == "research"
    assert job_name("my-run-v2", "ep3-ba1500") != name  # run names differing in case/punctuation never share Jobs
    assert manifest["metadata"]["labels"]["dip-scale/run"] == "My_Run.v2"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"][:3] == ["python", "-m", "dip_scale.eval.fid"] and job.model_file in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["envFrom"] == [{"secretRef": {"name": "dip-scale-s3"}}]
    assert (tmp_path / "ep3-ba1500.job.yaml").exists()
    long = job_name("r" * 80, "ep100-ba500400")
    assert len(long) <= 63 and long != job_name("r" * 79 + "s", "ep100-ba500400")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    with pytest.raises(ConfigError, match="api_server"):
        KubernetesBackend(KubernetesConfig(), "r", str(tmp_path), 2).check()


@pytest.mark.slow
def test_training_creates_a_kubernetes_job_per_checkpoint_whose_command_works(tiny_mds, standin_inception, kube_api, s3, tmp_path):
    """Jobs are created through the API while training runs; running a Job's container command
    as written (what the pod does) writes the FID result where the training run looks for it.
    The API is away (503s) when the first Job is created, after the pre-flight: the trainer gives
    up on it for now, logs it, trains on and creates it at a later poll."""
    reference = write_reference(f"{s3['url']}/fid/ref.npz", standin_inception, _images(32))
    save_folder = f"{s3['url']}/runs/{{run_name}}/checkpoints"

    def away_until_given_up():
        deadline = time.time() + 240
        while time.time() < deadline and not any("dryRun=All" in path for _, path in kube_api["requests"]):
            time.sleep(0.05)
        with kube_api["lock"]:
            kube_api["fail"]["POST"] = [503] * 1000
        log = tmp_path / "run.launcher.log"
        while time.time() < deadline and "retrying at the next poll" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        with kube_api["lock"]:
            kube_api["fail"]["POST"] = []

    away = threading.Thread(target=away_until_given_up, daemon=True)
    away.start()
    run(_eval_overrides(tiny_mds, tmp_path, save_folder, reference, standin_inception, **{
        "eval.backend": "kubernetes", "eval.kubernetes.api_server": kube_api["url"], "eval.kubernetes.namespace": "ml",
        "eval.wait_at_end": "false"}),  # the Jobs of this API never finish by themselves
        cwd=tmp_path, env=env_with_repo_on_path(**s3["env"]))
    away.join()
    out = logs(tmp_path)
    assert "creating eval Job dip-eval-t-ep1-ba10" in out and "retrying at the next poll" in out, out
    jobs = kube_api["jobs"]
    steps = sorted(naming.parse_export(j["metadata"]["annotations"]["dip-scale/model-file"].rsplit("/", 1)[1]).batch for j in jobs.values())
    assert steps == [10, 20], out
    job = next(j for j in jobs.values() if j["metadata"]["annotations"]["dip-scale/model-file"].endswith("-ba20.safetensors"))
    argv = job["spec"]["template"]["spec"]["containers"][0]["command"]
    proc = subprocess.run([PYTHON, *argv[1:]], capture_output=True, text=True, env=env_with_repo_on_path(**s3["env"]), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(storage.read_bytes(job["metadata"]["annotations"]["dip-scale/result"]))
    assert result["step"] == 20 and math.isfinite(result["fid"])
    assert result["model_file"] == f"{s3['url']}/runs/t/checkpoints/ema/ep{result['epoch']}-ba20.safetensors"
    # after training: the curve from whatever results the Jobs have left in S3
    curve = subprocess.run([PYTHON, str(ROOT / "tools" / "fid_curve.py"), f"{s3['url']}/runs/t/checkpoints", "--out", str(tmp_path / "fid.png")],
                           capture_output=True, text=True, env=env_with_repo_on_path(**s3["env"]), timeout=120)
    assert curve.returncode == 0, curve.stderr
    (row,) = [line.split() for line in curve.stdout.splitlines() if line.split()[:1] == ["20"]]
    assert float(row[3]) == pytest.approx(result["fid"], abs=5e-4)
    assert (tmp_path / "fid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_dispatch_problems_fail_early_or_never_stop_training(tiny_mds, standin_inception, tmp_path):
    """Not in a cluster and no API server, or an API that refuses the trainer's account: refused
    before training starts, nothing written."""
    reference = tmp_path / "ref.npz"
    stats = FeatureStats()
    stats.add(np.random.default_rng(0).normal(size=(4, 2048)))
    save_reference(str(reference), stats, feature_mode="clean", inception_sha256=sha256_of(standin_inception))
    args = _eval_overrides(tiny_mds, tmp_path, str(tmp_path / "ckpt"), str(reference), standin_inception,
                           **{"eval.backend": "kubernetes", "trainer.max_duration": "10ba"})
    env = {k: v for k, v in env_with_repo_on_path(KUBECONFIG=str(tmp_path / "no-kubeconfig")).items() if k != "KUBERNETES_SERVICE_HOST"}
    proc = subprocess.run([PYTHON, str(ROOT / "dip_scale" / "train.py"), str(ROOT / "yamls" / "dip_tiny_cpu.yaml"), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "eval.kubernetes.api_server is not set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()

    from kube_server import serve

    server, state = serve("127.0.0.1")  # an API that refuses the trainer's service account: before step 0
    state["fail"]["POST"] = [403]
    proc = subprocess.run([PYTHON, str(ROOT / "dip_scale" / "train.py"), str(ROOT / "yamls" / "dip_tiny_cpu.yaml"), *args,
                           f"eval.kubernetes.api_server={state['url']}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    server.shutdown()
    server.server_close()
    assert proc.returncode == 2 and "rbac.yaml" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (only,) = state["requests"]  # the dry-run create of the pre-flight, nothing after it
    assert "dryRun=All" in only[1] and not (tmp_path / "ckpt").exists()
    # (an API that goes away after the pre-flight: the Kubernetes training test above)
