"""Write a small random conv net with the interface of clean-fid's TorchScript Inception
(`inception-2015-12-05.pt`) for offline demos and tests.

    dip-standin-inception --out data/demo-weights/inception-2015-12-05.pt

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
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class _Mixed(nn.Module):
    """A block whose first output channels are its 1x1 branch `conv`, as in Inception's mixed_6."""

    def __init__(self, cin: int, branch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, branch, 1), nn.ReLU())
        self.tower = nn.Sequential(nn.Conv2d(cin, branch, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class StandInInception(nn.Module):
    """The layout of the TF-ported Inception: `layers` (299x299 inputs scaled to [-1, 1], run as a
    sequence; `mixed_6.conv` is a 17x17 branch), `output` (2048 -> 1008), and
    `forward(img, return_features, use_fp16, no_output_bias)` taking 0..255 images of any size,
    resized inside with the same TF-style bilinear sampling, returning features or probabilities."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(OrderedDict(
            conv=nn.Sequential(nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.ReLU()),      # 299 -> 75
            conv_1=nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()),   # -> 38
            conv_2=nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()),   # -> 19
            conv_3=nn.Sequential(nn.Conv2d(32, 32, 3), nn.ReLU()),                        # -> 17
            mixed_6=_Mixed(32, 16),
            pool2=nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 2048), nn.ReLU()),
        ))
        self.output = nn.Linear(2048, 1008)
        for m in self.modules():  # He init: features that tell images apart (PyTorch's default makes them ~constant)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.output.weight, std=0.05)  # class probabilities that are not flat, so IS > 1

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        b, c, h, w = img.shape
        x = img.to(torch.float16 if use_fp16 else torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


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
