"""The training loader: MDS shards written by tools/convert_imagenet_mds.py, streamed from a
local folder or s3:// (S3_ENDPOINT_URL + AWS credentials), decoded to (image, label) pairs.

Resumption is exact through Composer's dataset state: Composer calls
`StreamingDataset.state_dict(num_samples, from_beginning=True)` at each checkpoint and
`load_state_dict` on resume, and streaming replays the same global sample order from there
(same global batch size and `num_canonical_nodes` required).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from dip_scale import storage
from dip_scale.data.imagenet import DATASET_FILE, DatasetInfo, to_tensor_array


class ImageNetMDS(StreamingDataset):
    """StreamingDataset over the converter's schema: yields (uint8 image (3,H,W), int label).

    Images leave the loader as uint8 and are mapped to [-1, 1] on the accelerator
    (`imagenet.to_model_range`, inside the model): float32 is 4x the bytes through the
    worker -> trainer pipe and cost ~15% of loader throughput (tools/bench_data.py), and an
    integer batch is never touched by Composer's DeepSpeed bf16 batch cast. The optional
    horizontal flip is decided by (shuffle seed, epoch, sample id), not by a worker RNG, so a
    resumed run flips exactly what the uninterrupted run would have."""

    def __init__(self, *, hflip: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hflip = hflip

    def _flip(self, idx: int) -> bool:
        epoch = max(self.next_epoch - 1, 0)
        return bool(np.random.default_rng([self.shuffle_seed, epoch, idx]).random() < 0.5)

    def __getitem__(self, idx: int):
        sample = super().__getitem__(idx)
        arr = to_tensor_array(sample["image"])
        if self.hflip and self._flip(idx):
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), sample["label"]


def dataset_info(data_cfg) -> DatasetInfo | None:
    """The converter's dataset.json (class names, resolution), or None for foreign MDS data."""
    raw = storage.read_bytes(storage.join(data_cfg.remote, DATASET_FILE))
    return DatasetInfo.from_json(raw.decode()) if raw else None


def build_dataset(data_cfg, *, device_batch_size: int, seed: int, cache_dir: str) -> ImageNetMDS:
    """The split named by `data_cfg` read in place (local folder) or through `cache_dir` (S3)."""
    split = storage.join(data_cfg.remote, data_cfg.split)
    if storage.is_s3(split):
        remote, local = split, data_cfg.local or cache_dir
    else:
        if not os.path.isfile(os.path.join(split, "index.json")):
            raise FileNotFoundError(
                f"data.remote: no MDS index at {split}/index.json; convert the data first "
                "(python tools/convert_imagenet_mds.py --src ... --out " + data_cfg.remote + ")"
            )
        remote, local = None, split
    return ImageNetMDS(
        remote=remote,
        local=local,
        shuffle=data_cfg.shuffle,
        shuffle_algo=data_cfg.shuffle_algo,
        shuffle_seed=seed,
        num_canonical_nodes=data_cfg.num_canonical_nodes,
        predownload=data_cfg.predownload,
        cache_limit=data_cfg.cache_limit,
        batch_size=device_batch_size,
        hflip=data_cfg.hflip,
    )


def build_train_dataloader(data_cfg, *, device_batch_size: int, seed: int, cache_dir: str) -> DataLoader:
    """Stale shared memory of crashed runs is cleaned first (local rank 0, others wait)."""
    clean_stale_shared_memory()
    dataset = build_dataset(data_cfg, device_batch_size=device_batch_size, seed=seed, cache_dir=cache_dir)
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        num_workers=data_cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=data_cfg.num_workers > 0,
        prefetch_factor=2 if data_cfg.num_workers > 0 else None,
    )
