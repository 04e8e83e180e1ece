"""Convert an ImageNet-1k tree to MDS shards, locally or straight to S3.

    dip-convert --src /data/imagenet --out s3://bucket/imagenet-mds-256

Input: train/<wnid>/*.JPEG; val/ in <wnid>/ folders or flat with LOC_val_solution.csv or the
devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat. Classes are the sorted wnids.
Every file whose name ends in a suffix Pillow opens (.JPEG, .png, .webp, .tif, ...) is
converted, sub-folders of class folders included; every other file is listed in the report
with the reason (counts are printed). A class folder without images is an error unless
--allow-empty-classes.
Output: <out>/<split>/ (MDS, an xxh64 hash per shard), <out>/dataset.json,
<out>/conversion_report.json. Rerunning the same command after a crash finishes the job; the
same input and --seed give identical output. An output split holding another writer's
index.json is refused. Undecodable files are listed in the report and make the run exit 1
unless --skip-bad.
"""
from __future__ import annotations

import argparse
import os
import sys

from dip_scale.data.convert import ConvertError, Settings, convert
from dip_scale.storage import StorageUnreachable
from dip_scale.data.imagenet import ENCODINGS


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="ImageNet root holding train/ and val/")
    ap.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (S3_ENDPOINT_URL + AWS credentials)")
    ap.add_argument("--splits", default="train,val", help="comma-separated split folders to convert")
    ap.add_argument("--resolution", type=int, default=256, help="ADM centre crop size (the paper: 256 or 512); 0 keeps originals")
    ap.add_argument("--encoding", default="png", choices=ENCODINGS, help="png (lossless, default) | jpeg | original file bytes")
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--png-compress-level", type=int, default=1, help="zlib level 0-9 (1: 4x faster to encode than 6, 25%% faster to decode, ~5%% larger)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0, help="sample-order shuffle seed")
    ap.add_argument("--chunk-size", type=int, default=10_000, help="images per resumable unit (one MDS partition)")
    ap.add_argument("--shard-size", default="64mb", help="MDS shard size limit")
    ap.add_argument("--limit-per-class", type=int, default=None, help="keep the first N images of each class (subsets)")
    ap.add_argument("--skip-bad", action="store_true", help="accept undecodable files (listed in the report) and exit 0")
    ap.add_argument("--allow-empty-classes", action="store_true", help="keep class folders without images as classes with 0 images")
    ap.add_argument("--validate", type=int, nargs="?", const=200, default=0, metavar="N",
                    help="check every shard's xxh64 hash (reads the whole output once) and decode N random stored "
                         "samples (default 200) against the source")
    ap.add_argument("--synsets", default=None, help="LOC_synset_mapping.txt / synset_words.txt / devkit meta.mat (class names)")
    ap.add_argument("--val-labels", default=None, help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt for a flat val/")
    args = ap.parse_args(argv)

    errors = []
    if not os.path.isdir(args.src):
        errors.append(f"--src: {args.src} is not a folder")
    if args.resolution < 0:
        errors.append(f"--resolution: must be >= 0, got {args.resolution}")
    if args.encoding == "original" and args.resolution:
        errors.append("--encoding original stores the source file bytes unchanged, so it needs --resolution 0")
    if not 1 <= args.jpeg_quality <= 100:
        errors.append(f"--jpeg-quality: must be in 1..100, got {args.jpeg_quality}")
    if not 0 <= args.png_compress_level <= 9:
        errors.append(f"--png-compress-level: must be in 0..9, got {args.png_compress_level}")
    if args.workers < 1 or args.chunk_size < 1:
        errors.append("--workers and --chunk-size must be >= 1")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        errors.append(f"--limit-per-class: must be >= 1, got {args.limit_per_class}")
    if not (args.out.startswith("s3://") or "://" not in args.out):
        errors.append(f"--out: {args.out} is neither a local folder nor s3://bucket/prefix")
    args.splits = [s for s in args.splits.split(",") if s]
    for s in args.splits:
        if os.path.isdir(args.src) and not os.path.isdir(os.path.join(args.src, s)):
            errors.append(f"--splits: {os.path.join(args.src, s)} does not exist")
    if errors:
        ap.error("; ".join(errors))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings(
        resolution=args.resolution,
        encoding=args.encoding,
        jpeg_quality=args.jpeg_quality,
        png_compress_level=args.png_compress_level,
        seed=args.seed,
        chunk_size=args.chunk_size,
        shard_size=args.shard_size,
        limit_per_class=args.limit_per_class,
    )
    try:
        code = convert(args.src, args.out, args.splits, settings, args.workers, args.skip_bad, args.validate, args.synsets, args.val_labels,
                       args.allow_empty_classes)
    except (ConvertError, PermissionError, StorageUnreachable) as e:
        print(f"convert_imagenet_mds: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert_imagenet_mds: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130
    report = os.path.join(args.out, "conversion_report.json") if "://" not in args.out else args.out.rstrip("/") + "/conversion_report.json"
    print(("done" if code == 0 else "NOT complete") + f"; report: {report}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
