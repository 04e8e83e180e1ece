"""Write a small random conv net with the interface of clean-fid's TorchScript Inception
(`inception-2015-12-05.pt`) for offline demos and tests.

    python tools/make_standin_inception.py --out data/demo-weights/inception-2015-12-05.pt

The real file cannot be fetched here (nothing is downloaded at run time), but the whole FID path
- clean-fid's InceptionV3W loading a TorchScript file, its resizers, our running statistics and
clean-fid's frechet_distance - should still run for real. FIDs measured with this network are
self-consistent but NOT comparable with published numbers; put the real file in its place
(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)
for those.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


class StandInInception(nn.Module):
    """`layers(x)` takes 299x299 images scaled to [-1, 1]; `forward(x, return_features=True)` takes
    0..255 images of any size and resizes inside, as the TF-ported Inception does."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 7, stride=4, padding=3), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(512, 2048),
        )

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def write(path: str, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.jit.save(torch.jit.script(StandInInception(seed).eval()), path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path ending in inception-2015-12-05.pt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
