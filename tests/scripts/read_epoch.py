"""Test harness run under the real `composer -n 2` launcher: read an MDS split through
dip_scale's loader on every rank and record which samples each rank saw, optionally saving
the dataset state after K batches exactly as Composer does at a checkpoint (and reading on, as
training does), or resuming from such a state.

    read_epoch.py REMOTE OUT_DIR --batch 2 [--state-after K] [--resume STATE.json] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import os

import dip_scale.data.streaming as loader_module
from dip_scale.config import DataConfig



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("remote")
    ap.add_argument("out_dir")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--state-after", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # as in training: the process group exists before any StreamingDataset (streaming would
    # otherwise create and destroy its own, racing between ranks)
    from composer.devices import DeviceCPU
    from composer.utils import dist

    dist.initialize_dist(DeviceCPU())

    cfg = DataConfig(remote=args.remote, split=args.split, batch_size=args.batch * world, num_workers=args.workers)
    loader = loader_module.build_train_dataloader(cfg, device_batch_size=args.batch, seed=17, cache_dir=os.path.join(args.out_dir, "cache"))
    if args.resume:
        with open(args.resume) as f:
            loader.dataset.load_state_dict(json.load(f))
    seen, shapes = [], set()
    for _ in range(args.epochs):
        for images, _labels, ids in loader:
            shapes.add((tuple(images.shape[1:]), str(images.dtype)))
            seen.append(ids.tolist())
            if len(seen) == args.state_after and rank == 0:  # what Composer stores in a checkpoint
                state = loader.dataset.state_dict(num_samples=len(seen) * args.batch * world, from_beginning=True)
                with open(os.path.join(args.out_dir, "state.json"), "w") as f:
                    json.dump(state, f)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"batches": seen, "shapes": sorted(map(list, shapes))}, f)


if __name__ == "__main__":
    main()
