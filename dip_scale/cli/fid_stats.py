"""Reference statistics for the evaluation suite (docs/evaluation.md): Inception features of a
converted split, or of an images .npz, as running float64 sums.

    dip-fid-stats --data s3://bkt/imagenet-mds-256 --split train \\
        --inception /opt/dip_scale/weights/inception-2015-12-05.pt --out s3://bkt/fid/imagenet256_train.npz
    dip-fid-stats --images-npz IMAGES.npz --inception W --out REF.npz   # ADM's layout

From a split written by dip-convert (already ADM centre-cropped, so the
reference sees exactly the preprocessing the model trained on): an .npz with `mu`, `sigma`
(pool features: FID), `mu_s`, `sigma_s` (spatial features: sFID), `pr_features` (pool features of
the first --pr-images images: precision/recall) and a JSON `meta` (feature mode, image count,
resolution, source, Inception sha256) that `eval.reference_stats` points at. From an images .npz
(`arr_0`, uint8 N x H x W x 3): ADM's reference-batch layout, `arr_0` + mu/sigma/mu_s/sigma_s
(+ meta). Paper-comparable numbers use ADM's own VIRTUAL_imagenet256_labeled.npz (read as is).
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="converted dataset root (local or s3://), as data.remote")
    src.add_argument("--images-npz", help="uint8 images (arr_0, N x H x W x 3), e.g. a reference batch: writes ADM's layout")
    ap.add_argument("--split", default="train")
    ap.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt")
    ap.add_argument("--out", required=True, help=".npz to write (local or s3://)")
    ap.add_argument("--feature-mode", default="legacy_tensorflow", choices=["legacy_tensorflow", "clean"])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    ap.add_argument("--pr-images", type=int, default=10000, help="images whose pool features are kept for precision/recall (ADM: 10k)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    args = ap.parse_args(argv)

    import numpy as np
    from tqdm.auto import tqdm

    from dip_scale import storage
    from dip_scale.config import DataConfig
    from dip_scale.eval.features import SPATIAL_DIM, FeatureStats, InceptionFeatures, save_reference, sha256_of
    from dip_scale.eval.fid import read_sample_batch, resolve_device

    def features(get, n):
        pool, spatial, kept = FeatureStats(), FeatureStats(SPATIAL_DIM), []
        for start in tqdm(range(0, n, args.batch_size), desc="reference features", unit="batch"):
            f = extract(get(start, min(start + args.batch_size, n)))
            pool.add(f["pool"])
            spatial.add(f["spatial"])
            if start < args.pr_images:
                kept.append(f["pool"][: args.pr_images - start].astype(np.float32))
        return pool, spatial, np.concatenate(kept)

    try:
        extract = InceptionFeatures(args.inception, args.feature_mode, resolve_device(args.device))
        meta = dict(feature_mode=args.feature_mode, inception_sha256=sha256_of(args.inception))
        if args.images_npz:
            images = read_sample_batch(args.images_npz)
            n = len(images) if args.limit is None else min(args.limit, len(images))
            pool, spatial, _ = features(lambda a, b: images[a:b], n)
            save_reference(args.out, pool, spatial, images=images[:n], source=args.images_npz,
                           source_sha256=sha256_of(args.images_npz), image_size=int(images.shape[1]), **meta)
        else:
            from dip_scale.data.streaming import build_dataset

            with tempfile.TemporaryDirectory() as cache:
                data = build_dataset(DataConfig(remote=args.data, split=args.split, shuffle=False), device_batch_size=1, seed=0, cache_dir=cache)
                n = len(data) if args.limit is None else min(args.limit, len(data))
                size = int(data[0][0].shape[-1])  # square images (the converter's resolution)
                pool, spatial, kept = features(lambda a, b: np.stack([data[i][0].permute(1, 2, 0).numpy() for i in range(a, b)]), n)
            save_reference(args.out, pool, spatial, pr_features=kept, source=storage.join(args.data, args.split), image_size=size, **meta)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_fid_stats: {e}", file=sys.stderr)
        return 2
    print(f"{pool.n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
