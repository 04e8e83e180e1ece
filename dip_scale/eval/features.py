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


def load_feature_extractor(weights: str, mode: str, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """-> fn(uint8 images (B, H, W, 3)) -> float64 features (B, 2048), clean-fid `mode`
    ('clean': PIL bicubic to 299 outside the net; 'legacy_tensorflow': the net's own TF-style resize)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    if os.path.basename(weights) != INCEPTION_FILENAME or not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights: expected a local file named {INCEPTION_FILENAME}, got {weights}")
    if mode not in ("clean", "legacy_tensorflow"):
        raise ValueError(f"feature mode must be 'clean' or 'legacy_tensorflow', got {mode!r}")
    try:
        net = InceptionV3W(os.path.dirname(os.path.abspath(weights)), download=False, resize_inside=mode == "legacy_tensorflow")
    except RuntimeError as e:  # torch.jit.load's "PytorchStreamReader failed ..." names no file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{weights}: not a TorchScript Inception network ({first}); expected clean-fid's "
                         f"{INCEPTION_FILENAME}") from None
    net = net.to(device).eval()
    resize = build_resizer(mode)

    def extract(images: np.ndarray) -> np.ndarray:
        # per image, what cleanfid.utils.ResizeDataset.__getitem__ does before batching
        batch = []
        for img in images:
            r = resize(img)
            t = torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1).float()
            batch.append(t)  # uint8 and float resizer outputs are both on the 0..255 scale
        with torch.no_grad():
            return net(torch.stack(batch).to(device)).double().cpu().numpy()

    return extract


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


def save_reference(path: str, stats: FeatureStats, **meta) -> None:
    """Reference statistics as .npz (mu, sigma + a JSON `meta`: feature mode, count, source)."""
    mu, sigma = stats.mean_cov()
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps({"num_images": stats.n, **meta})))
    storage.write_bytes(path, buf.getvalue())


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (mu, sigma, meta) from our .npz or ADM's reference batch (keys mu, sigma; its meta is
    empty, so its feature mode cannot be checked: it is TF Inception, i.e. legacy_tensorflow).
    meta["sha256"] is the file's, from the same read (ADM's file also holds images: GBs)."""
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
        meta: Optional[dict] = json.loads(str(z["meta"])) if "meta" in z.files else {}
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}), got {mu.shape} and {sigma.shape}")
    return mu, sigma, {**meta, "sha256": digest}


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
            f"rebuild it with tools/make_fid_stats.py or pass --foreign-reference")
