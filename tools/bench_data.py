"""Data-path throughput on this machine, one table: converter images/s per worker (PNG and
JPEG), loader images/s per worker, and loader / bare-decode (the same stored bytes decoded in a
plain loop: the physical limit of this design on one core). Goal: loader >= 80% of bare decode.

    python tools/bench_data.py [--images 400] [--resolution 256] [--shard-size 64mb]

Source images are ImageNet-sized random crops (short side 300-500) of scikit-image's photos.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def bench_encoding(tree: str, out: str, encoding: str, args, samples) -> dict:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from dip_scale.config import DataConfig
    from dip_scale.data.convert import Settings, convert_chunk
    from dip_scale.data.imagenet import to_tensor_array
    from dip_scale.data.streaming import build_dataset

    settings = Settings(resolution=args.resolution, encoding=encoding, jpeg_quality=95, shard_size=args.shard_size)
    start = time.perf_counter()
    convert_chunk(out, "train", 0, samples, settings)  # one worker's whole job, MDS writing included
    convert_s = time.perf_counter() - start
    from streaming.base.util import merge_index

    merge_index([os.path.join(out, "train", "chunk-00000", "index.json")], os.path.join(out, "train"))

    raw = StreamingDataset(local=os.path.join(out, "train"), shuffle=False, batch_size=1)
    stored = [raw[i]["image"] for i in range(len(raw))]
    del raw
    start = time.perf_counter()
    for data in stored:  # bare decode: bytes in memory -> RGB array
        to_tensor_array(data)
    bare_s = time.perf_counter() - start

    cfg = DataConfig(remote=out, split="train", num_workers=1, shuffle=True)
    rates = []
    for _ in range(args.loader_epochs):
        ds = build_dataset(cfg, device_batch_size=args.loader_batch, seed=0, cache_dir=os.path.join(out, "cache"))
        loader = DataLoader(ds, batch_size=args.loader_batch, num_workers=1, drop_last=False)
        it = iter(loader)
        first = next(it)  # worker start-up excluded
        n, start = 0, time.perf_counter()
        for images, *_ in it:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
        assert first[0].dtype == torch.uint8
        del it, loader, ds
    loader_rate = max(rates)
    return {
        "encoding": encoding if encoding != "jpeg" else "jpeg q95",
        "kib_per_image": round(sum(map(len, stored)) / len(stored) / 1024, 1),
        "convert_img_s_per_worker": round(len(samples) / convert_s, 1),
        "bare_decode_img_s": round(len(stored) / bare_s, 1),
        "loader_img_s_per_worker": round(loader_rate, 1),
        "loader_vs_bare": round(loader_rate / (len(stored) / bare_s), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--shard-size", default="64mb")
    ap.add_argument("--encodings", default="png,jpeg")
    ap.add_argument("--loader-epochs", type=int, default=2, help="best of N loader passes")
    ap.add_argument("--loader-batch", type=int, default=32, help="per-device batch of the timed loader (its first batch is not timed)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from dip_scale.data import demo_tree
    from dip_scale.data.convert import find_wnids, scan_split, shuffled
    from dip_scale.data.imagenet import class_index

    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        per_class = max(1, args.images // len(demo_tree.PHOTOS))
        demo_tree.make(tree, len(demo_tree.PHOTOS), per_class, 0, "folders", False, 0, short_side=(300, 500))
        classes = class_index(find_wnids(tree))
        samples = shuffled(scan_split(tree, "train", classes, None).samples, 0, "train")
        rows = [bench_encoding(tree, os.path.join(tmp, enc), enc, args, samples) for enc in args.encodings.split(",")]

    print(f"{len(samples)} ImageNet-sized JPEGs -> {args.resolution}px ADM crops, shard size {args.shard_size}, 1 core per worker")
    head = f"{'encoding':<10} {'KiB/img':>8} {'convert img/s':>14} {'bare decode img/s':>18} {'loader img/s':>13} {'loader/bare':>12}"
    print(head)
    for r in rows:
        print(f"{r['encoding']:<10} {r['kib_per_image']:>8} {r['convert_img_s_per_worker']:>14} {r['bare_decode_img_s']:>18} "
              f"{r['loader_img_s_per_worker']:>13} {r['loader_vs_bare']:>12}")
    print(json.dumps({"images": len(samples), "resolution": args.resolution, "shard_size": args.shard_size, "rows": rows}))


if __name__ == "__main__":
    main()
