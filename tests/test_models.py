"""The DiP model family: paper parameter counts, shapes for every head x placement x patch
size, placement semantics, RoPE, and a tiny model overfitting a fixed batch."""
from __future__ import annotations

import itertools
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON, ROOT, env_with_repo_on_path
from dip_scale.config import load_config
from dip_scale.diffusion.flow import FlowMatchingObjective
from dip_scale.models import build_model
from dip_scale.models.blocks import apply_rope, patchify, rope_2d, unpatchify
from dip_scale.models.dip import HEAD_MODULES

HEADS = ["conv_unet", "mlp", "coord_mlp", "patch_attention"]
PLACEMENTS = ["post_hoc", "intermediate", "hybrid"]


def _meta_params(*overrides):
    cfg = load_config(None, list(overrides))
    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES)
    return total, head


def test_paper_parameter_counts_on_meta_device():
    dit, dit_head = _meta_params("model.head.type=none")
    dip, dip_head = _meta_params()  # conv_unet, post_hoc: the released head
    dip_interp, _ = _meta_params("model.head.upsample=interpolate")
    assert abs(dit - 628.6e6) / 628.6e6 <= 0.003, dit  # Table 2: DiT-only 26 x 1152 = 629M
    assert 630.5e6 <= dip <= 632.5e6, dip  # Table 1: DiP-XL/16 = 631M
    assert 630.5e6 <= dip_interp <= 632.5e6, dip_interp
    assert 0.003 <= (dip - dit) / dit <= 0.006  # "only 0.3% increase" (the head replaces the final layer)
    assert dit - dit_head == dip - dip_head  # the trunk is identical


def _tiny(head, placement, patch, image=64, **extra):
    channels = {8: "[16,32,64]", 16: "[16,32,64,128]", 32: "[16,32,64,128]"}[patch]
    overrides = [
        f"model.preset=tiny/{patch}", f"model.image_size={image}", "model.num_classes=10",
        f"model.head.type={head}", f"model.head.placement={placement}", f"model.head.channels={channels}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.mark.parametrize(
    "head, placement, patch",
    list(itertools.product(HEADS, PLACEMENTS, [8, 16, 32])) + [("none", "post_hoc", p) for p in (8, 16, 32)],
)
def test_every_head_placement_and_patch_size(head, placement, patch):
    torch.manual_seed(0)
    cfg = _tiny(head, placement, patch)
    model = build_model(cfg.model)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = model(x, torch.rand(2), torch.tensor([3, 10]))  # 10 = the null label
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    assert torch.isfinite(x.grad).all()
    has = {m: hasattr(model, m) for m in HEAD_MODULES}
    assert has["head"] == (head != "none" and placement in ("post_hoc", "hybrid"))
    assert has["mid_head"] == has["inject"] == (placement in ("intermediate", "hybrid"))
    assert has["final_layer"] == (head == "none" or placement == "intermediate")


def test_released_init_touches_only_the_embeddings():
    torch.manual_seed(0)
    model = build_model(_tiny("conv_unet", "post_hoc", 16).model)  # model.init: released (the default)
    assert model.x_embed.bias.abs().max() == 0
    for w in (model.y_embed.table.weight, model.t_embed.mlp[0].weight, model.t_embed.mlp[2].weight):
        assert abs(w.std().item() - 0.02) < 0.002
    # blocks keep nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases, no adaLN-zero
    bound = 1 / model.trunk.hidden_size ** 0.5
    for block in model.blocks:
        for w in (block.adaLN.weight, block.adaLN.bias, block.attn.proj.bias):
            assert 0.9 * bound < w.abs().max() <= bound
    x, t, y = torch.randn(2, 3, 64, 64), torch.rand(2), torch.tensor([1, 2])
    assert model(x, t, y).abs().max() > 0


def test_dit_init_starts_at_zero_and_dip_head_sees_the_noisy_pixels():
    torch.manual_seed(0)
    dit = build_model(_tiny("none", "post_hoc", 16, **{"model.init": "dit"}).model)
    dip = build_model(_tiny("conv_unet", "post_hoc", 16, **{"model.init": "dit"}).model)
    x, t, y = torch.randn(2, 3, 64, 64), torch.rand(2), torch.tensor([1, 2])
    assert dit(x, t, y).abs().max() == 0  # adaLN-Zero + zero final layer
    # DiP's head reads the pixels of its own patch: perturbing one patch changes only that patch
    # at init (trunk blocks are identity at init and attention cannot mix yet)
    x2 = x.clone()
    x2[:, :, :16, :16] += 1.0
    diff = (dip(x2, t, y) - dip(x, t, y)).abs().sum(dim=(0, 1))
    assert diff[:16, :16].sum() > 0 and diff[16:, :].sum() == 0 and diff[:, 16:].sum() == 0


def test_intermediate_injection_reaches_the_output():
    torch.manual_seed(0)
    model = build_model(_tiny("conv_unet", "intermediate", 16).model)
    torch.nn.init.normal_(model.inject.weight, std=0.02)  # zero-initialised: make the path live
    for block in model.blocks:  # and the blocks after it
        torch.nn.init.normal_(block.adaLN.weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    x, t, y = torch.randn(2, 3, 64, 64), torch.rand(2), torch.tensor([1, 2])
    before = model(x, t, y)
    with torch.no_grad():
        model.mid_head.out.bias.add_(1.0)
    assert not torch.allclose(before, model(x, t, y))


def test_capture_returns_the_hidden_state_after_k_blocks():
    model = build_model(_tiny("conv_unet", "post_hoc", 16).model)
    x, t, y = torch.randn(2, 3, 64, 64), torch.rand(2), torch.tensor([1, 2])
    out, hidden = model(x, t, y, capture=2)
    assert hidden.shape == (2, 16, model.trunk.hidden_size)
    assert torch.equal(out, model(x, t, y))


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).view(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 3, 16, 16)
    assert torch.equal(p[:, 4], x[:, :, 16:32, 16:32])  # row-major: token 4 = row 1, col 1
    assert torch.equal(unpatchify(p, 2, 3), x)
    # same flattening as F.unfold (the released code's layout)
    assert torch.equal(p.flatten(2), F.unfold(x, 16, stride=16).transpose(1, 2))


@pytest.mark.parametrize("image, patch", [(64, 16), (256, 16), (512, 16), (512, 32)])
def test_rope_positions_are_the_released_linspace(image, patch):
    n = image // patch
    head_dim = 72  # XL: 1152 / 16
    cos, sin = rope_2d(head_dim, n, n, "cpu")
    angles = torch.atan2(sin, cos)  # (N, 36), wrapped to (-pi, pi]
    pos = [16 * i / (n - 1) for i in range(n)]  # linspace(0, 16, n): the span is 16 whatever the grid
    freqs = [10000 ** (-4 * j / head_dim) for j in range(head_dim // 4)]
    for token in (0, 1, n + 2, n * n - 1):
        row, col = divmod(token, n)
        for j, f in enumerate(freqs):
            for pair, p in ((2 * j, pos[col]), (2 * j + 1, pos[row])):  # x then y, interleaved
                want = torch.tensor(p * f)
                want = torch.atan2(torch.sin(want), torch.cos(want))
                assert abs(angles[token, pair] - want) < 1e-4, (token, pair)


def test_rope_2d_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_2d(head_dim, 8, 8, "cpu")
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(pq, pk):
        iq, ik = pq[0] * 8 + pq[1], pk[0] * 8 + pk[1]
        return (apply_rope(q[None], cos[iq], sin[iq]) * apply_rope(k[None], cos[ik], sin[ik])).sum()

    assert torch.allclose(score((1, 2), (3, 5)), score((4, 3), (6, 6)), atol=1e-5)  # same offset (2, 3)
    assert not torch.allclose(score((1, 2), (3, 5)), score((1, 2), (5, 3)), atol=1e-3)  # transposed offset


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = _tiny("conv_unet", "post_hoc", 16, image=32, **{"model.head.channels": "[32,64,128,256]"})
    model = build_model(cfg.model)
    objective = FlowMatchingObjective(cfg.objective, cfg.model.num_classes)
    # smooth images (natural-image-like), fixed noise and times: a pure memorisation check
    x0 = F.interpolate(torch.rand(4, 3, 6, 6) * 2 - 1, size=32, mode="bicubic").clamp(-1, 1)
    y = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):  # measured: the loss falls ~25x in 200 steps, ~70x in 300
        loss = objective(model, x0, y, generator=torch.Generator().manual_seed(0))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.slow
def test_model_summary_tool_reports_paper_counts():
    out = subprocess.run(
        [PYTHON, str(ROOT / "tools" / "model_summary.py"), str(ROOT / "yamls" / "dit_xl16_baseline.yaml"),
         "objective.repa.enabled=false", "model.head.type=conv_unet"],
        capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["params"] == summary["params_trunk"] + summary["params_head"]
    assert 630.5e6 <= summary["params"] <= 632.5e6
    assert summary["tokens"] == 256 and summary["gmacs_per_image"] > summary["gmacs_head"] > 0
    assert any(line.startswith("head") for line in lines) and any(line.startswith("trunk") for line in lines)
