"""Inception features the clean-fid way, and their statistics kept as running sums.

The feature network is clean-fid's own `InceptionV3W` over the TorchScript file
`inception-2015-12-05.pt`, read from a local path (never downloaded); images go through
clean-fid's resizer for the chosen mode exactly as its folder loader does. Statistics are
float64 running sums (n, Σf, Σffᵀ), so 50k samples never sit in memory and partial results
from several processes merge by addition.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from dip_scale import storage
from dip_scale.config import INCEPTION_FILENAME

FEATURE_DIM = 2048


def sha256_of(path: str) -> str:
    data = storage.read_bytes(path)
    if data is None:
        raise FileNotFoundError(path)
    return hashlib.sha256(data).hexdigest()


SPATIAL_CHANNELS = 7  # ADM's evaluator: mixed_6/conv[..., :7] -> 7 x 17 x 17 = 2023 values
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
NUM_LOGITS = 1008  # the 2015 Inception's output layer (1000 ImageNet classes + 8 unused)


class InceptionFeatures:
    """Everything ADM's evaluator reads from the 2015 Inception, in one forward pass of the
    TorchScript network clean-fid loads (docs/evaluation.md, "Features"):

    * `pool` (B, 2048): the pool_3 features -> FID, precision/recall. Equal to clean-fid's own
      features for the same mode (its InceptionV3W).
    * `spatial` (B, 2023): the first 7 channels of `mixed_6/conv` (the 1x1 branch of block
      mixed_6, 17x17), flattened height, width, channel as ADM does from TensorFlow's NHWC -> sFID.
    * `logits` (B, 1008): pool features times the output layer's weight, without its bias, as
      ADM's evaluator (and StyleGAN's `no_output_bias=True`) takes them -> Inception Score.

    The network's `layers` are run child by child so that mixed_6's branch can be read; the
    'legacy_tensorflow' resize (the network's own, inside its forward) is done here the same way.
    Both are checked against the network's own forward when it is loaded: a file whose layout
    differs is refused rather than given numbers under names they would not deserve."""

    def __init__(self, weights: str, mode: str, device: torch.device):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if os.path.basename(weights) != INCEPTION_FILENAME or not os.path.isfile(weights):
            raise FileNotFoundError(f"Inception weights: expected a local file named {INCEPTION_FILENAME}, got {weights}")
        if mode not in ("clean", "legacy_tensorflow"):
            raise ValueError(f"feature mode must be 'clean' or 'legacy_tensorflow', got {mode!r}")
        try:
            wrapper = InceptionV3W(os.path.dirname(os.path.abspath(weights)), download=False, resize_inside=mode == "legacy_tensorflow")
        except RuntimeError as e:  # torch.jit.load's "PytorchStreamReader failed ..." names no file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{weights}: not a TorchScript Inception network ({first}); expected clean-fid's "
                             f"{INCEPTION_FILENAME}") from None
        self.net = wrapper.base.to(device).eval()
        self.mode, self.device, self.weights = mode, device, weights
        self.resize = build_resizer(mode)
        self._check_layout()

    def _tf_resize(self, x: torch.Tensor) -> torch.Tensor:
        """The network's own resize to 299 (TensorFlow's bilinear, as its TorchScript forward does it)."""
        b, c, h, w = x.shape
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float (B, 3, H, W) on the 0..255 scale (299 unless legacy_tensorflow)."""
        if self.mode == "legacy_tensorflow":
            x = self._tf_resize(x)
        x = (x - 128) / 128
        spatial = None
        for name, child in self.net.layers.named_children():
            if name == "mixed_6":
                s = child.conv(x)[:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # NHWC order, as ADM flattens
            x = child(x)
        if spatial is None or spatial.shape[1] != SPATIAL_DIM:
            raise ValueError(f"{self.weights}: no mixed_6/conv of 7 x 17 x 17 values among the network's layers")
        pool = x.reshape(x.shape[0], FEATURE_DIM)
        logits = torch.nn.functional.linear(pool, self.net.output.weight)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    @torch.no_grad()
    def _check_layout(self) -> None:
        size = 299 if self.mode == "clean" else 64
        probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0), device="cpu").to(self.device) * 255
        ours = self._forward(probe)
        pool = self.net(probe, return_features=True) if self.mode == "legacy_tensorflow" else self.net.layers((probe - 128) / 128)
        probs = self.net(probe, no_output_bias=True)  # at 299 px the network's own resize is the identity
        ok = torch.allclose(ours["pool"], pool.reshape(2, -1), rtol=1e-4, atol=1e-4) and torch.allclose(
            torch.softmax(ours["logits"], 1), probs, rtol=1e-4, atol=1e-6)
        if not ok:
            raise ValueError(f"{self.weights}: its layers run one by one do not reproduce its own forward; "
                             f"not the layout of clean-fid's {INCEPTION_FILENAME}")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images (B, H, W, 3) -> {"pool", "spatial", "logits"} as float64 arrays."""
        batch = []
        for img in images:  # per image, what cleanfid.utils.ResizeDataset.__getitem__ does before batching
            r = self.resize(img)
            batch.append(torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1).float())  # 0..255 either way
        with torch.no_grad():
            out = self._forward(torch.stack(batch).to(self.device))
        return {k: v.double().cpu().numpy() for k, v in out.items()}


def load_feature_extractor(weights: str, mode: str, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """-> fn(uint8 images (B, H, W, 3)) -> float64 pool features (B, 2048), clean-fid `mode`
    ('clean': PIL bicubic to 299 outside the net; 'legacy_tensorflow': the net's own TF-style resize)."""
    net = InceptionFeatures(weights, mode, device)
    return lambda images: net(images)["pool"]


class FeatureStats:
    """Running n, Σf and Σffᵀ in float64 -> mean and (unbiased, as np.cov) covariance."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureStats") -> None:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer

    def save(self, path: str) -> None:
        """The raw sums (partial results of one process), to be merged elsewhere."""
        np.savez(path, n=self.n, sum=self.sum, outer=self.outer)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        stats = cls.__new__(cls)
        with np.load(path) as z:
            stats.n, stats.sum, stats.outer = int(z["n"]), z["sum"], z["outer"]
        return stats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def save_reference(path: str, stats: FeatureStats, spatial: Optional[FeatureStats] = None,
                   pr_features: Optional[np.ndarray] = None, images: Optional[np.ndarray] = None, **meta) -> None:
    """Reference statistics as .npz: `mu`, `sigma` (+ `mu_s`, `sigma_s` of the spatial features, the
    pool features `pr_features` of up to 10k images for precision/recall, or ADM's own `arr_0`
    images) and a JSON `meta` (feature mode, count, source, Inception sha256, image size)."""
    mu, sigma = stats.mean_cov()
    arrays = {"mu": mu, "sigma": sigma, "meta": np.array(json.dumps({"num_images": stats.n, **meta}))}
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = spatial.mean_cov()
    if pr_features is not None:
        arrays["pr_features"] = np.asarray(pr_features, np.float32)
    if images is not None:
        arrays["arr_0"] = images
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(path, buf.getvalue())


@dataclass
class Reference:
    """A reference set as the metrics need it: pool statistics (FID), spatial statistics (sFID)
    and, for precision/recall, either the pool features of its images or the images (ADM's
    `arr_0`, whose features are extracted by the job)."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pr_features: Optional[np.ndarray] = None
    images: Optional[np.ndarray] = None

    def missing_for(self, metrics) -> list[str]:
        """The requested metrics this reference cannot serve, each with the reason."""
        out = []
        if "sfid" in metrics and self.mu_s is None:
            out.append("sfid (no mu_s/sigma_s)")
        for m in ("precision", "recall"):
            if m in metrics and self.pr_features is None and self.images is None:
                out.append(f"{m} (no reference images arr_0 or pr_features)")
        return out


def load_reference_set(path: str) -> Reference:
    """Our .npz (dip-fid-stats) or ADM's reference batch as it is
    (VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s, sigma_s and the images arr_0; it records
    no meta). meta["sha256"] is the file's, from the same read."""
    data = storage.read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"reference statistics not found: {path}")
    digest = hashlib.sha256(data).hexdigest()
    if not data.startswith(b"PK"):  # an .npz is a zip archive; np.load would blame allow_pickle
        raise ValueError(f"{path}: not an .npz file (expected a zip archive holding mu and sigma)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not FID reference statistics (missing {', '.join(missing)}; has {', '.join(z.files)})")
        meta: dict = json.loads(str(z["meta"])) if "meta" in z.files else {}
        ref = Reference(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), {**meta, "sha256": digest})
        if "mu_s" in z.files and "sigma_s" in z.files:
            ref.mu_s, ref.sigma_s = z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64)
        if "pr_features" in z.files:
            ref.pr_features = z["pr_features"].astype(np.float32)
        elif "arr_0" in z.files:
            ref.images = z["arr_0"]
    shapes = {"mu": (ref.mu, (FEATURE_DIM,)), "sigma": (ref.sigma, (FEATURE_DIM, FEATURE_DIM))}
    if ref.mu_s is not None:
        shapes.update(mu_s=(ref.mu_s, (SPATIAL_DIM,)), sigma_s=(ref.sigma_s, (SPATIAL_DIM, SPATIAL_DIM)))
    for key, (arr, want) in shapes.items():
        if arr.shape != want:
            raise ValueError(f"{path}: expected {key} of shape {want}, got {arr.shape}")
    if ref.pr_features is not None and (ref.pr_features.ndim != 2 or ref.pr_features.shape[1] != FEATURE_DIM):
        raise ValueError(f"{path}: expected pr_features of shape (N, {FEATURE_DIM}), got {ref.pr_features.shape}")
    if ref.images is not None and (ref.images.ndim != 4 or ref.images.shape[-1] != 3 or ref.images.dtype != np.uint8):
        raise ValueError(f"{path}: expected arr_0 as uint8 images (N, H, W, 3), got {ref.images.dtype} {ref.images.shape}")
    return ref


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (mu, sigma, meta) of a reference (see load_reference_set)."""
    ref = load_reference_set(path)
    return ref.mu, ref.sigma, ref.meta


def reference_problem(path: str, meta: dict, *, inception_sha256: str, feature_mode: str,
                      image_size: Optional[int], foreign: bool) -> Optional[str]:
    """Why reference statistics `meta` (from load_reference) cannot be compared with features of
    this network, mode and resolution, or None. A reference without a record of its network
    (ADM's batches, older files) is usable only as an explicit foreign reference: nothing then
    proves the features match, and the result's protocol says so (docs/evaluation.md)."""
    if meta.get("feature_mode", feature_mode) != feature_mode:
        return f"{path} holds {meta['feature_mode']!r} features; this evaluation uses {feature_mode!r}"
    if image_size is not None and meta.get("image_size", image_size) != image_size:
        return f"{path} holds features of {meta['image_size']} px images; the model generates {image_size} px"
    recorded = meta.get("inception_sha256")
    if foreign or recorded == inception_sha256:
        return None
    if recorded is None:
        return (f"{path} records no Inception network (e.g. ADM's reference batch); to compare with it anyway "
                f"pass --foreign-reference (eval.foreign_reference: true)")
    return (f"{path} was built with Inception sha256 {recorded}, this evaluation uses {inception_sha256}; "
            f"rebuild it with dip-fid-stats or pass --foreign-reference")
