"""Pictures people would rather look at than read: labelled sample grids as PNG."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from dip_scale.diffusion.sampler import to_uint8


def image_grid(images: torch.Tensor, titles: Optional[Sequence[str]] = None, ncol: Optional[int] = None, min_cell: int = 128) -> Image.Image:
    """[-1, 1] images (B, 3, H, W) -> one RGB grid; small images are upscaled (nearest) to
    `min_cell` so a 64px demo is still legible; an optional caption above each cell."""
    tiles = [Image.fromarray(a.numpy()) for a in to_uint8(images)]
    n = len(tiles)
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    w, h = tiles[0].size
    scale = max(1, math.ceil(min_cell / w))
    cw, ch = w * scale, h * scale
    cap = 14 if titles else 0
    grid = Image.new("RGB", (ncol * cw, nrow * (ch + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = (i % ncol) * cw, (i // ncol) * (ch + cap)
        grid.paste(tile.resize((cw, ch), Image.NEAREST), (x, y + cap))
        if titles:
            draw.text((x + 2, y + 1), str(titles[i])[: max(4, cw // 6)], fill="black")
    return grid


def save_png(img: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a line cut short by a crash mid-write is skipped."""
    import json

    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _plot(png_path: str, draw) -> str:
    """One 6x3.5in matplotlib figure drawn by `draw(ax)`, saved as a PNG (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    draw(ax)
    ax.set_xlabel("step (batches)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def plot_metrics(jsonl_path: str, png_path: str, keys: Sequence[str] = ("loss",)) -> str:
    """Curves of metrics.jsonl columns against the step, as a PNG (no tracking service needed)."""
    rows = read_jsonl(jsonl_path)

    def draw(ax):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, linewidth=1)
        ax.set_yscale("log")
        ax.legend()

    return _plot(png_path, draw)


METRIC_LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall"}


def plot_eval(rows: Sequence[dict], png_path: str, title: Optional[str] = None) -> str:
    """The evaluation curves of a run (fid.jsonl rows): one panel per metric, one line per
    guidance scale, each point labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRIC_LABELS if any(m in r for r in rows)] or ["fid"]
    scales = sorted({r.get("cfg_scale") for r in rows}, key=lambda s: -1.0 if s is None else s)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for scale in scales:
            pts = sorted((r["step"], r[metric]) for r in rows if r.get("cfg_scale") == scale and metric in r)
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", linewidth=1, label="sampler CFG" if scale is None else f"CFG {scale:g}")
            for x, y in pts:
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6)
        ax.set_title(METRIC_LABELS[metric], fontsize=9)
        ax.set_xlabel("step (batches)")
        ax.grid(alpha=0.3)
    if len(scales) > 1:
        axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path

