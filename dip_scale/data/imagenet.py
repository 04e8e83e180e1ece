"""ImageNet-1k as MDS: the one schema shared by the converter (writer) and the loader (reader),
so the two can never disagree on class order, preprocessing or encoding.

Layout written by dip-convert under `--out`:
    <out>/dataset.json              classes (index, wnid, name), preprocessing, encoding
    <out>/conversion_report.json    counts per split and class, every file not converted and why, settings, time
    <out>/<split>/index.json        the merged MDS index of the split (an xxh64 hash per shard)
    <out>/<split>/chunk-NNNNN/      one MDS partition per fixed chunk of the (shuffled) sample list
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

COLUMNS = {"image": "bytes", "label": "int", "key": "str"}  # encoded image file, class index, source path
DATASET_FILE = "dataset.json"
REPORT_FILE = "conversion_report.json"
INDEX_FILE = "index.json"  # streaming's index of an MDS folder (a split)
ENCODINGS = ("png", "jpeg", "original")
SHARD_HASH = "xxh64"  # written into index.json per shard; checked by --validate and data.validate_hash


def class_index(wnids) -> dict[str, int]:
    """Sorted WordNet ids -> 0..K-1: the torchvision ImageFolder / ADM order."""
    return {w: i for i, w in enumerate(sorted(set(wnids)))}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion `center_crop_arr`): halve with a box filter while the
    short side is at least twice the target, resize bicubically so the short side equals the
    target, then crop the centre. Returns an (image_size, image_size, C) uint8 array."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_rgb(data: bytes) -> Image.Image:
    """Decode any stored/source image bytes (JPEG, PNG, CMYK, greyscale, palette) to RGB.
    Raises on truncated or undecodable data (PIL's lazy decoding is forced here)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def preprocess(img: Image.Image, resolution: int) -> Image.Image:
    """RGB image -> ADM centre crop at `resolution` (0: unchanged)."""
    return Image.fromarray(center_crop_arr(img, resolution)) if resolution else img


def encode_image(img: Image.Image, encoding: str, jpeg_quality: int, png_compress_level: int) -> bytes:
    out = io.BytesIO()
    if encoding == "png":
        img.save(out, format="PNG", compress_level=png_compress_level)
    elif encoding == "jpeg":
        img.save(out, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"cannot re-encode to {encoding!r}; valid: png, jpeg")
    return out.getvalue()


def to_tensor_array(data: bytes) -> np.ndarray:
    """Stored image bytes -> (H, W, 3) uint8 array, the reader's decode step."""
    return np.array(load_rgb(data))  # writable: torch.from_numpy warns on read-only buffers


def to_model_range(images):
    """uint8 images (B, 3, H, W) -> float32 in [-1, 1], the model's pixel range (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass
class DatasetInfo:
    """What `<out>/dataset.json` holds: enough to interpret every sample without the source."""

    classes: list[dict] = field(default_factory=list)  # [{"index": 0, "wnid": "n01440764", "name": "tench"}, ...]
    resolution: int = 256  # 0: original sizes
    encoding: str = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 1
    seed: int = 0
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DatasetInfo":
        return cls(**json.loads(text))
