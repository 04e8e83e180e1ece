"""Reference statistics for FID: Inception features of a converted split, as running float64 sums.

    python tools/make_fid_stats.py --data s3://bkt/imagenet-mds-256 --split train \\
        --inception /opt/dip_scale/weights/inception-2015-12-05.pt --out s3://bkt/fid/imagenet256_train.npz

Reads the MDS split written by tools/convert_imagenet_mds.py (already ADM centre-cropped, so the
reference sees exactly the preprocessing the model trained on) and writes an .npz with `mu`,
`sigma` and a JSON `meta` (feature mode, image count, resolution, source, Inception sha256) that
`eval.reference_stats` points at. Paper-comparable numbers use ADM's own
VIRTUAL_imagenet256_labeled.npz instead (its mu/sigma are read the same way).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="converted dataset root (local or s3://), as data.remote")
    ap.add_argument("--split", default="train")
    ap.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt")
    ap.add_argument("--out", required=True, help=".npz to write (local or s3://)")
    ap.add_argument("--feature-mode", default="legacy_tensorflow", choices=["legacy_tensorflow", "clean"])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    args = ap.parse_args(argv)

    import numpy as np
    from tqdm.auto import tqdm

    from dip_scale import storage
    from dip_scale.config import DataConfig
    from dip_scale.data.streaming import build_dataset
    from dip_scale.eval.features import FeatureStats, load_feature_extractor, save_reference, sha256_of
    from dip_scale.eval.fid import resolve_device

    try:
        extract = load_feature_extractor(args.inception, args.feature_mode, resolve_device(args.device))
        with tempfile.TemporaryDirectory() as cache:
            data = build_dataset(DataConfig(remote=args.data, split=args.split, shuffle=False), device_batch_size=1, seed=0, cache_dir=cache)
            n = len(data) if args.limit is None else min(args.limit, len(data))
            size = int(data[0][0].shape[-1])  # square images (the converter's resolution)
            stats = FeatureStats()
            for start in tqdm(range(0, n, args.batch_size), desc="reference features", unit="batch"):
                images = np.stack([data[i][0].permute(1, 2, 0).numpy() for i in range(start, min(start + args.batch_size, n))])
                stats.add(extract(images))
    except (FileNotFoundError, ValueError) as e:
        print(f"make_fid_stats: {e}", file=sys.stderr)
        return 2
    save_reference(args.out, stats, feature_mode=args.feature_mode, source=storage.join(args.data, args.split),
                   inception_sha256=sha256_of(args.inception), image_size=size)
    print(f"{stats.n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
