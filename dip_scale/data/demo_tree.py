"""Build a small ImageNet-layout folder offline: one class per scikit-image sample photograph,
each class filled with random crops of its photograph (varied sizes and aspect ratios, saved as
JPEG like ImageNet). The embedded-default demo converts it; the tests reuse it, adding the
oddities of the real ImageNet train set with --oddities.

    dip-demo-data --out data/demo-imagenet [--classes 8] [--train-per-class 48]

Layout: train/<wnid>/*.JPEG, val/ (per --val-layout), LOC_synset_mapping.txt.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
VAL_LAYOUTS = ("folders", "flat-csv", "flat-devkit")


def wnid(i: int) -> str:
    return f"n{90000000 + i:08d}"


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def random_crop(img: Image.Image, rng: np.random.Generator, short_side: tuple[int, int] = (72, 320)) -> Image.Image:
    """A random crop (20-90% of the short side, aspect 3:4..4:3) resized to a random short side
    in `short_side` (default: on both sides of 2x a small target, so the ADM box-halving path
    runs; ImageNet-like sizes are (300, 500))."""
    s = min(img.size)
    side = int(s * rng.uniform(0.2, 0.9))
    aspect = rng.uniform(0.75, 1.33)
    w, h = min(img.width, int(side * aspect)), side
    left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    crop = img.crop((left, top, left + w, top + h))
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    scale = short / min(crop.size)
    return crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)


def save_jpeg(img: Image.Image, path: str, quality: int = 90) -> None:
    img.save(path, format="JPEG", quality=quality)


def add_oddities(root: str, rng: np.random.Generator, base: Image.Image) -> dict[str, str]:
    """The real ImageNet train set's oddities, in class 0: a CMYK JPEG, a PNG named .JPEG, a
    greyscale JPEG and a truncated file. Returns {relative path: kind}."""
    d = os.path.join(root, "train", wnid(0))
    odd = {}
    img = random_crop(base, rng)
    p = os.path.join(d, "odd_cmyk.JPEG")
    img.convert("CMYK").save(p, format="JPEG", quality=92)
    odd["train/" + wnid(0) + "/odd_cmyk.JPEG"] = "cmyk"
    p = os.path.join(d, "odd_png_named_jpeg.JPEG")
    random_crop(base, rng).save(p, format="PNG")
    odd["train/" + wnid(0) + "/odd_png_named_jpeg.JPEG"] = "png"
    p = os.path.join(d, "odd_greyscale.JPEG")
    random_crop(base, rng).convert("L").save(p, format="JPEG", quality=90)
    odd["train/" + wnid(0) + "/odd_greyscale.JPEG"] = "greyscale"
    buf = io.BytesIO()
    random_crop(base, rng).save(buf, format="JPEG", quality=90)
    with open(os.path.join(d, "odd_truncated.JPEG"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    odd["train/" + wnid(0) + "/odd_truncated.JPEG"] = "truncated"
    return odd


def make(
    out: str, classes: int, train_per_class: int, val_per_class: int, val_layout: str, oddities: bool, seed: int,
    short_side: tuple[int, int] = (72, 320),
) -> dict:
    if classes > len(PHOTOS):
        sys.exit(f"--classes: at most {len(PHOTOS)} (one per sample photograph: {', '.join(PHOTOS)})")
    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in PHOTOS[:classes]]
    with open(os.path.join(_mkdir(out), "LOC_synset_mapping.txt"), "w") as f:
        for i, name in enumerate(PHOTOS[:classes]):
            f.write(f"{wnid(i)} {name.replace('_', ' ')}\n")
    for i, img in enumerate(photos):
        d = _mkdir(os.path.join(out, "train", wnid(i)))
        for j in range(train_per_class):
            save_jpeg(random_crop(img, rng, short_side), os.path.join(d, f"{wnid(i)}_{j}.JPEG"))
    val = [(i, j) for i in range(classes) for j in range(val_per_class)]
    order = rng.permutation(len(val))  # flat val files are not class-sorted, like ImageNet's
    vdir = _mkdir(os.path.join(out, "val"))
    rows = []
    for n, k in enumerate(order, start=1):
        i, _ = val[k]
        img = random_crop(photos[i], rng, short_side)
        if val_layout == "folders":
            save_jpeg(img, os.path.join(_mkdir(os.path.join(vdir, wnid(i))), f"ILSVRC2012_val_{n:08d}.JPEG"))
        else:
            save_jpeg(img, os.path.join(vdir, f"ILSVRC2012_val_{n:08d}.JPEG"))
        rows.append((f"ILSVRC2012_val_{n:08d}", i))
    if val_layout == "flat-csv":
        with open(os.path.join(out, "LOC_val_solution.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for stem, i in rows:
                w.writerow([stem, f"{wnid(i)} 1 2 30 40"])
    elif val_layout == "flat-devkit":  # devkit ids are not in sorted-wnid order: reverse them
        from scipy.io import savemat

        ids = {i: classes - i for i in range(classes)}
        with open(os.path.join(out, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
            f.writelines(f"{ids[i]}\n" for _, i in rows)
        synsets = np.array(
            [(ids[i], wnid(i), PHOTOS[i], 0) for i in range(classes)],
            dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
        )
        savemat(os.path.join(out, "meta.mat"), {"synsets": synsets})
    odd = add_oddities(out, rng, photos[0]) if oddities else {}
    return {"classes": classes, "train": classes * train_per_class + len(odd), "val": len(val), "oddities": odd}


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--train-per-class", type=int, default=48)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--val-layout", default="folders", choices=VAL_LAYOUTS)
    ap.add_argument("--oddities", action="store_true", help="add a CMYK, a PNG-as-JPEG, a greyscale and a truncated file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "train")):
        print(f"{args.out} already holds a dataset; remove it or pick another --out", file=sys.stderr)
        return 2
    info = make(args.out, args.classes, args.train_per_class, args.val_per_class, args.val_layout, args.oddities, args.seed)
    print(f"wrote {info['train']} train and {info['val']} val images in {info['classes']} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
