"""The training loader: MDS shards written by dip-convert, streamed from a
local folder or s3:// (S3_ENDPOINT_URL + AWS credentials), decoded to (image, label) pairs.

Resumption is exact through Composer's dataset state: Composer calls
`StreamingDataset.state_dict(num_samples, from_beginning=True)` at each checkpoint and
`load_state_dict` on resume, and streaming replays the same global sample order from there
(same global batch size and `num_canonical_nodes` required).

Damaged data is named, never served or hidden: any error reading a sample names its shard
(and the sample's source key); with `data.validate_hash` every shard is checked against the
converter's xxh64 hash as it enters the cache (a local folder is then copied into the cache,
since streaming checks nothing it reads in place) and a copy that fails is deleted.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from dip_scale import storage
from dip_scale.data.imagenet import DATASET_FILE, INDEX_FILE, SHARD_HASH, DatasetInfo, to_tensor_array

CHECK_HINT = "check every shard with dip-convert --validate (same arguments as the conversion)"


class ShardError(RuntimeError):
    """A shard that could not be fetched, checked or decoded, named with its place."""


class ImageNetMDS(StreamingDataset):
    """StreamingDataset over the converter's schema: yields (uint8 image (3,H,W), int label,
    int sample id). The id (the sample's index in the dataset) keys the sample's diffusion noise
    (diffusion/flow.py), so the noise does not depend on which rank reads the sample.

    Images leave the loader as uint8 and are mapped to [-1, 1] on the accelerator
    (`imagenet.to_model_range`, inside the model): float32 is 4x the bytes through the
    worker -> trainer pipe and cost ~15% of loader throughput (tools/bench_data.py), and an
    integer batch is never touched by Composer's DeepSpeed bf16 batch cast. The optional
    horizontal flip is decided by (shuffle seed, epoch, sample id), not by a worker RNG, so a
    resumed run flips exactly what the uninterrupted run would have."""

    def __init__(self, *, hflip: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hflip = hflip
        self._shard_failure = None  # set by a failed prepare_shard, possibly in streaming's download thread

    def _flip(self, idx: int) -> bool:
        epoch = max(self.next_epoch - 1, 0)
        return bool(np.random.default_rng([self.shuffle_seed, epoch, idx]).random() < 0.5)

    def shard_path(self, shard_id: int) -> str:
        """Where the shard lives: the remote object, or the local file read in place."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        return os.path.join(stream.remote or stream.local, stream.split or "", self.shards[shard_id].file_pairs[0][0].basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's fetch and hash check, with a failure named, its cached copy removed, and
        the epoch stopped without a hang."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:  # noqa: BLE001 - download, hash or cache errors alike are named
            self._shard_failure = f"{self.shard_path(shard_id)}: {type(e).__name__}: {e}"
            if self.streams[self.stream_per_shard[shard_id]].remote:  # the cache holds a copy, never the data itself
                self.shards[shard_id].evict()  # a failed copy must not be served by the next run
                # "present but missing" makes every worker that needs the shard fetch and check it
                # itself (and fail the same way) instead of waiting for this one forever
                self._shard_states[shard_id] = _ShardState.LOCAL
            if getattr(self, "_event", None) is not None:
                self._event.set()  # streaming's download threads stop on this event
            if blocking:  # a sample is waiting for the shard: fail it here
                raise ShardError(self._shard_failure) from e
            # a download thread (blocking=False) must return: one that raises never reports its
            # exit, and the end of streaming's __iter__ waits for that report forever

    def __iter__(self):
        yield from super().__iter__()
        if self._shard_failure:  # streaming ends the epoch quietly when its download threads stop
            raise ShardError(self._shard_failure)

    def __getitem__(self, idx: int):
        sample = None
        try:
            sample = super().__getitem__(idx)
            arr = to_tensor_array(sample["image"])
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the damage, the shard is named
            if self._shard_failure:  # streaming's "Background thread failed": say what failed
                raise ShardError(self._shard_failure) from e
            key = f" ({sample['key']})" if isinstance(sample, dict) and "key" in sample else ""
            raise ShardError(f"{self.shard_path(self.spanner[idx][0])}: cannot read sample {idx}{key}: "
                             f"{type(e).__name__}: {e}; {CHECK_HINT}") from e
        if self.hflip and self._flip(idx):
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), sample["label"], idx


def dataset_info(data_cfg) -> DatasetInfo | None:
    """The converter's dataset.json (class names, resolution), or None for foreign MDS data."""
    raw = storage.read_bytes(storage.join(data_cfg.remote, DATASET_FILE))
    return DatasetInfo.from_json(raw.decode()) if raw else None


def dataset_problems(data_cfg, model_cfg) -> list[str]:
    """Why the data cannot train the model (empty: it can), before anything is built: a missing
    folder, split or index, a resolution or class count other than the model's (from the
    converter's dataset.json), an index without the hashes data.validate_hash needs."""
    remote = data_cfg.remote
    convert = f"convert the data first: dip-convert --src ... --out {remote}"
    if not storage.is_s3(remote) and not os.path.isdir(remote):
        return [f"data.remote: no such folder: {remote} ({convert})"]
    index_path = storage.join(remote, data_cfg.split, INDEX_FILE)
    try:
        info = dataset_info(data_cfg)
        index = storage.read_bytes(index_path)
    except Exception as e:  # noqa: BLE001 - a missing bucket or credentials: one line naming the place
        return [f"data.remote: cannot read {remote}: {type(e).__name__}: {e}"]
    problems = []
    if index is None:
        splits = f"the splits there: {', '.join(sorted(info.splits))}" if info else convert
        problems.append(f"data.split: {data_cfg.split!r} has no MDS index ({index_path} not found); {splits}")
    if info is not None:
        if info.resolution != model_cfg.image_size:
            held = f"{info.resolution}x{info.resolution} images" if info.resolution else "images at their original sizes"
            problems.append(f"model.image_size: {model_cfg.image_size}, but {remote} holds {held} (its {DATASET_FILE}); set "
                            f"model.image_size={info.resolution or '...'} or convert with --resolution {model_cfg.image_size}")
        if len(info.classes) != model_cfg.num_classes:
            problems.append(f"model.num_classes: {model_cfg.num_classes}, but {remote} holds {len(info.classes)} classes (its {DATASET_FILE})")
    if data_cfg.validate_hash and index is not None:
        shards = json.loads(index)["shards"]
        unhashed = sum(SHARD_HASH not in s["raw_data"].get("hashes", {}) for s in shards)
        if unhashed:
            problems.append(f"data.validate_hash: {unhashed} of {len(shards)} shards in {index_path} have no {SHARD_HASH} hash "
                            "(converted before hashes were written); reconvert, or set data.validate_hash=false")
    return problems


def build_dataset(data_cfg, *, device_batch_size: int, seed: int, cache_dir: str) -> ImageNetMDS:
    """The split named by `data_cfg` read in place (local folder) or through `cache_dir` (S3, or
    a local folder whose shards are to be hash-checked)."""
    split = storage.join(data_cfg.remote, data_cfg.split)
    if not storage.is_s3(split) and not os.path.isfile(os.path.join(split, INDEX_FILE)):
        raise FileNotFoundError(
            f"data.remote: no MDS index at {split}/{INDEX_FILE}; convert the data first "
            "(dip-convert --src ... --out " + data_cfg.remote + ")"
        )
    if storage.is_s3(split) or data_cfg.validate_hash:
        remote, local = split, data_cfg.local or cache_dir
    else:
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
        validate_hash=SHARD_HASH if data_cfg.validate_hash else None,
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
