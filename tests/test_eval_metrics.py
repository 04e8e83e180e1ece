"""The evaluation suite's numbers, each checked against an independent implementation on the same
features: torch-fidelity for IS and precision/recall, clean-fid's `frechet_distance` for FID and
sFID, known closed-form values, and ADM's file layouts read and written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_scale.eval.features import SPATIAL_DIM, FeatureStats, InceptionFeatures, load_reference_set, sha256_of
from dip_scale.eval.metrics import InceptionScoreSums, MetricState, frechet, precision_recall
from dip_scale.eval.metrics import frechet_distance as ours_frechet


def test_inception_score_equals_torch_fidelity_and_known_values():
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10000, 1008)) * 3
    a, b = InceptionScoreSums(), InceptionScoreSums()
    for start in range(0, 10000, 1000):  # batches spread over two "processes", merged
        (a if (start // 1000) % 2 else b).add(logits[start : start + 1000], start)
    a.merge(b)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)["inception_score_mean"]
    assert a.score() == pytest.approx(theirs, rel=1e-9)  # ADM's splits of 5000 = torch-fidelity's 2 equal splits here

    uniform = InceptionScoreSums()
    uniform.add(np.zeros((5000, 1008)), 0)
    assert uniform.score() == pytest.approx(1.0, abs=1e-12)  # p(y|x) = p(y): no information
    one_hot = InceptionScoreSums()
    one_hot.add(np.eye(1008)[np.arange(5000) % 10] * 1e4, 0)  # confident and spread evenly over 10 classes
    assert one_hot.score() == pytest.approx(10.0, rel=1e-9)


def test_precision_recall_equal_torch_fidelity_and_the_limits():
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    smp = (rng.normal(size=(400, 16)) * 1.2 + 0.2).astype(np.float32)  # wider and shifted: precision < recall
    ours = precision_recall(ref, smp, block=128)  # blocks smaller than the sets: the blocked path
    theirs = calculate_precision_recall_part(torch.from_numpy(smp), torch.from_numpy(ref), neighborhood=3, batch_size=128)
    assert ours[0] == pytest.approx(theirs[0], abs=1 / 400) and ours[1] == pytest.approx(theirs[1], abs=1 / 300)
    assert 0.2 < ours[0] < ours[1] < 0.97  # a case where the answer is not trivial
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, ref + 100.0) == (0.0, 0.0)


@pytest.mark.slow
def test_fid_and_sfid_from_running_sums_equal_clean_fid_on_the_features():
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(2)
    feats = {"pool": rng.gamma(2.0, 1.0, size=(600, 2048)), "spatial": rng.gamma(2.0, 1.0, size=(600, SPATIAL_DIM)),
             "logits": rng.normal(size=(600, 1008))}
    state, other = MetricState(("fid", "sfid")), MetricState(("fid", "sfid"))
    state.add({k: v[:250] for k, v in feats.items()}, 0)
    other.add({k: v[250:] for k, v in feats.items()}, 250)
    state.merge(other)
    for key, stats in (("pool", state.pool), ("spatial", state.spatial)):  # two halves merged = numpy over all
        mu, sigma = stats.mean_cov()
        np.testing.assert_allclose(mu, feats[key].mean(0), rtol=1e-10)
        np.testing.assert_allclose(sigma, np.cov(feats[key], rowvar=False), rtol=1e-7, atol=1e-9)
    # the distance (FID on pool, sFID on spatial: one function) equals clean-fid's scipy-sqrtm one on
    # rank-deficient statistics (fewer samples than dimensions, as a small eval has) and, to
    # rounding, on full-rank ones (the paper's 50k samples); 512 dimensions: scipy's sqrtm at 2048
    # takes ~15 s on 2 cores
    for n, rel in ((300, 1e-6), (3000, 1e-10)):
        a, b = rng.gamma(2.0, 1.0, size=(n, 512)), rng.gamma(2.1, 1.0, size=(n + 100, 512))
        stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert ours_frechet(*stats) == pytest.approx(frechet_distance(*stats), rel=rel), n


def test_spatial_features_are_mixed6_conv_first_seven_channels_in_adm_order(standin_inception):
    """Read back independently: a forward hook on the eager network's mixed_6.conv, channels
    0..6, flattened height, width, channel (TensorFlow's NHWC, as ADM's evaluator flattens)."""
    from dip_scale.eval.standin_inception import StandInInception

    eager = StandInInception(seed=0).eval()  # the same weights as the scripted file (seed 0)
    seen = {}
    eager.layers.mixed_6.conv.register_forward_hook(lambda m, i, o: seen.update(out=o))
    images = np.random.default_rng(3).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    ours = InceptionFeatures(standin_inception, "legacy_tensorflow", torch.device("cpu"))(images)
    with torch.no_grad():
        probs = eager(torch.from_numpy(images).permute(0, 3, 1, 2).float(), no_output_bias=True)
    expected = seen["out"][:, :7].permute(0, 2, 3, 1).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(ours["spatial"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(ours["logits"]), 1).numpy(), probs.double().numpy(), rtol=1e-5, atol=1e-7)


def test_inception_file_of_another_layout_is_refused(tmp_path):
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2048))
            self.output = torch.nn.Linear(2048, 1008)

        def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
            f = self.layers(torch.nn.functional.interpolate(img, size=(299, 299)) / 128 - 1)
            return f if return_features else torch.softmax(self.output(f), 1)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(Flat()), str(path))
    with pytest.raises(ValueError, match="mixed_6|reproduce"):
        InceptionFeatures(str(path), "clean", torch.device("cpu"))


def _adm_reference(path: Path, images: np.ndarray, inception: str, mode: str) -> None:
    """ADM's reference-batch layout, built here: arr_0 + mu/sigma/mu_s/sigma_s, no meta."""
    f = InceptionFeatures(inception, mode, torch.device("cpu"))(images)
    np.savez(path, arr_0=images, mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False),
             mu_s=f["spatial"].mean(0), sigma_s=np.cov(f["spatial"], rowvar=False))


@pytest.mark.slow
def test_adm_reference_and_sample_batches_in_and_out(standin_inception, tmp_path):
    """One sampling pass -> the five metrics against an ADM-layout reference; --save-npz writes
    ADM's sample batch, which read back gives the same features, and `--samples` on it gives the
    same numbers without a model."""
    from test_eval import _fid_cli, _images, _tiny_model_file
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    ref_images = _images(50, seed=5)
    reference = tmp_path / "VIRTUAL_ref.npz"
    _adm_reference(reference, ref_images, standin_inception, "clean")
    ref = load_reference_set(str(reference))
    assert ref.images is not None and ref.mu_s.shape == (SPATIAL_DIM,) and "inception_sha256" not in ref.meta
    model = tmp_path / "model.safetensors"
    _tiny_model_file(str(model))
    common = ["--reference", str(reference), "--inception", standin_inception, "--feature-mode", "clean", "--foreign-reference"]
    proc = _fid_cli(str(model), *common, "--out", str(tmp_path / "r.json"), "--num-samples", "30", "--batch-size", "8",
                    "--steps", "2", "--processes", "2", "--save-npz", str(tmp_path / "samples.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["metrics"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert all(np.isfinite(result[k]) for k in result["metrics"]) and result["reference"]["foreign"] is True

    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        samples, labels = z["arr_0"], z["arr_1"]
    assert samples.dtype == np.uint8 and samples.shape == (30, 32, 32, 3) and labels.shape == (30,)
    net = InceptionFeatures(standin_inception, "clean", torch.device("cpu"))
    fs, fr = net(samples), net(ref_images)
    pool = FeatureStats()
    pool.add(fs["pool"])
    assert result["fid"] == pytest.approx(frechet(pool, ref.mu, ref.sigma), rel=1e-6)  # the written samples are the evaluated ones
    p, r = calculate_precision_recall_part(torch.from_numpy(fs["pool"]).float(), torch.from_numpy(fr["pool"]).float(), 3, 10000)
    assert result["precision"] == pytest.approx(p, abs=1 / 30) and result["recall"] == pytest.approx(r, abs=1 / 50)

    proc = _fid_cli("--samples", str(tmp_path / "samples.npz"), *common, "--out", str(tmp_path / "r2.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "r2.json").read_text())
    for k in result["metrics"]:
        assert again[k] == pytest.approx(result[k], rel=1e-6, abs=1e-9), k
    assert again["samples"]["sha256"] == sha256_of(str(tmp_path / "samples.npz")) and again["sampler"] is None


@pytest.mark.slow
def test_a_reference_without_what_a_metric_needs_is_named_before_sampling(standin_inception, tmp_path):
    from dip_scale.eval.features import save_reference
    from test_eval import _fid_cli, _images, _tiny_model_file

    stats = FeatureStats()
    stats.add(InceptionFeatures(standin_inception, "clean", torch.device("cpu"))(_images(20))["pool"])
    save_reference(str(tmp_path / "fid_only.npz"), stats, feature_mode="clean", inception_sha256=sha256_of(standin_inception))
    _tiny_model_file(str(tmp_path / "m.safetensors"))
    args = [str(tmp_path / "m.safetensors"), "--reference", str(tmp_path / "fid_only.npz"), "--inception", standin_inception,
            "--feature-mode", "clean", "--out", str(tmp_path / "r.json"), "--num-samples", "4", "--steps", "1"]
    proc = _fid_cli(*args)
    assert proc.returncode == 2 and "sfid (no mu_s/sigma_s)" in proc.stderr and "eval.metrics" in proc.stderr
    assert _fid_cli(*args, "--metrics", "fid,is").returncode == 0  # what it can serve still works
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == ["fid", "is"]
