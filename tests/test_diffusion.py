"""Flow-matching objective, samplers and REPA."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from dip_scale.diffusion.flow import (
    FlowMatchingObjective,
    drop_labels,
    interpolate,
    sample_time,
    velocity_target,
)
from dip_scale.diffusion.repa import DINOv2, DINOv2Encoder, RepaAligner
from dip_scale.diffusion.sampler import cfg_scale_at, sample
from dip_scale.models import build_model


def test_path_endpoints_and_velocity():
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1 is noise
    t, h = torch.full((3,), 0.3), 1e-3
    fd = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t)) / h
    assert torch.allclose(fd, velocity_target(x0, noise), atol=1e-3)  # v = dx_t/dt = eps - x0


def test_logit_normal_times():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, "logit_normal", 0.0, 1.0, "cpu", g)
    assert ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    shifted = sample_time(200_000, "logit_normal", 1.0, 1.0, "cpu", g)
    assert shifted.median() > 0.7  # positive mean: more time near noise


def test_label_dropout_rate_within_tolerance():
    n, p = 200_000, 0.1
    y = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, p, 1000, torch.Generator().manual_seed(2))
    rate = (out == 1000).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    kept = out != 1000
    assert torch.equal(out[kept], y[kept])  # kept labels are untouched


def _tiny_model_and_objective(**extra):
    cfg = tiny_config(**{"model.num_classes": 10, "model.head.channels": "[16,32,64,128]", **extra})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), FlowMatchingObjective(cfg.objective, cfg.model.num_classes)


def test_objective_uses_the_null_label_only_in_training():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.zeros_like(x)

    _, _, objective = _tiny_model_and_objective(**{"objective.label_dropout": 0.5})
    x0, y = torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long)
    objective.train()(Spy(), x0, y)
    objective.eval()(Spy(), x0, y)
    assert (seen[0] == 10).any() and not (seen[1] == 10).any()
    loss = objective(Spy(), x0, y)["total"]  # zero prediction: loss = E|eps - x0|^2 = 1
    assert abs(loss.item() - 1.0) < 0.05


def _released_guided_steps(steps: int, r_min: float, r_max: float, method: str) -> list[int]:
    """The steps the released sampler guides, computed in its own time r = 1 - t (r = 0 is noise):
    a float32 grid linspace(0, 1 - 1/steps, steps), guided where r_min < r < r_max (Euler) or
    r_min < r <= r_max (Heun), both compared in float32."""
    r = torch.linspace(0.0, 1.0 - 1.0 / steps, steps)
    lo, hi = torch.tensor(r_min), torch.tensor(r_max)
    upper = (r <= hi) if method == "heun" else (r < hi)
    return torch.nonzero((r > lo) & upper).flatten().tolist()


class _ConstantField(torch.nn.Module):
    """v = 1 for real labels, v = 0 for the null label; records every call's time and batch."""

    def __init__(self, null):
        super().__init__()
        self.null, self.calls = null, []

    def forward(self, x, t, y):
        self.calls.append((t[0].item(), x.shape[0]))
        return (y != self.null).float().view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guided_steps_match_the_released_sampler_at_the_paper_interval(method):
    # paper Appendix C: [0.11, 0.97] in the released time; [0.03, 0.89] in ours (t = 1 - r)
    field = _ConstantField(null=5)
    sample(field, torch.tensor([0]), [0], image_size=2, null_class=5, steps=100, method=method,
           cfg_scale=2.9, cfg_interval=(0.03, 0.89))
    per_step = field.calls if method == "euler" else field.calls[0::2]  # Heun: predictor calls
    guided = [i for i, (_, batch) in enumerate(per_step) if batch == 2]
    assert guided == _released_guided_steps(100, 0.11, 0.97, method)
    assert (guided[0], guided[-1]) == ((12, 96) if method == "euler" else (12, 97))


def test_cfg_interval_ends_follow_the_released_comparisons():
    lo, hi, w = 0.03, 0.89, 2.9
    assert cfg_scale_at(0.5, w, (lo, hi)) == w and cfg_scale_at(1.0, w, (lo, hi)) == 1.0
    assert cfg_scale_at(hi, w, (lo, hi), "euler") == 1.0 and cfg_scale_at(hi, w, (lo, hi), "heun") == 1.0
    assert cfg_scale_at(lo, w, (lo, hi), "euler") == 1.0 and cfg_scale_at(lo, w, (lo, hi), "heun") == w
    # a float32 grid point a rounding error away from an end is on that end
    assert cfg_scale_at(float(torch.tensor(lo)), w, (lo, hi), "heun") == w
    assert cfg_scale_at(float(torch.tensor(hi)), w, (lo, hi), "euler") == 1.0
    assert cfg_scale_at(hi - 1e-3, w, (lo, hi)) == w and cfg_scale_at(lo + 1e-3, w, (lo, hi)) == w


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guidance_is_applied_exactly_inside_the_interval(method):
    steps, scale, interval = 10, 3.0, (0.3, 0.7)  # grid t = 1.0, 0.9, ..., 0.1
    field = _ConstantField(null=5)
    x = sample(field, torch.tensor([0, 1]), [0, 1], image_size=4, null_class=5, steps=steps,
               method=method, cfg_scale=scale, cfg_interval=interval)
    ts = torch.linspace(1, 0, steps + 1).tolist()
    expected_calls = []
    drift = 0.0
    for t, t_next in zip(ts[:-1], ts[1:]):
        w = cfg_scale_at(t, scale, interval, method)  # one decision per step, at its start
        expected_calls.append(4 if w != 1.0 else 2)
        if method == "heun" and t_next > 0:
            expected_calls.append(4 if w != 1.0 else 2)  # the corrector is guided like its step
        drift += (t_next - t) * w  # the field is constant: predictor and corrector agree
    assert [batch for _, batch in field.calls] == expected_calls
    assert 4 in expected_calls and 2 in expected_calls
    noise = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    assert torch.allclose(x, (noise + drift).clamp(-1, 1), atol=1e-5)


def test_heun_corrector_uses_the_guidance_of_its_step():
    # interval [0.35, 0.7) on a 10-step grid: the step from t = 0.8 to 0.7 is unguided although
    # its corrector evaluates inside, at t = 0.7; the step 0.4 -> 0.3 is guided although its
    # corrector evaluates outside, at t = 0.3
    field = _ConstantField(null=5)
    sample(field, torch.tensor([0]), [0], image_size=2, null_class=5, steps=10, method="heun",
           cfg_scale=3.0, cfg_interval=(0.35, 0.7))
    corrector = {round(t, 4): batch for t, batch in field.calls[1::2]}
    assert corrector[0.7] == 1 and corrector[0.3] == 2


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_integrate_the_exact_field_to_the_data_point(method):
    target = torch.rand(1, 3, 8, 8) * 1.6 - 0.8

    class PointField(torch.nn.Module):  # exact flow of a delta distribution: v = (x_t - x0) / t
        def forward(self, x, t, y):
            return (x - target) / t.view(-1, 1, 1, 1)

    x = sample(PointField(), torch.tensor([0]), [7], image_size=8, null_class=1, steps=7, method=method)
    assert torch.allclose(x, target, atol=1e-5)


@pytest.mark.slow
def test_sampling_is_seeded_and_batch_independent():
    cfg, model, _ = _tiny_model_and_objective()
    model.eval()
    kw = dict(image_size=32, null_class=10, steps=4, cfg_scale=2.0, cfg_interval=(0.2, 0.8))
    a = sample(model, torch.tensor([1, 2]), [11, 12], **kw)
    b = sample(model, torch.tensor([1, 2]), [11, 12], **kw)
    c = sample(model, torch.tensor([2]), [12], **kw)
    d = sample(model, torch.tensor([1, 2]), [11, 13], **kw)
    assert torch.equal(a, b)
    assert torch.allclose(a[1:], c, atol=1e-5)  # image 2 does not depend on its batch-mates
    assert not torch.allclose(a[1], d[1])


# ---------------------------------------------------------------------------------- REPA
OFFICIAL_DINOV2_BLOCK_KEYS = {  # facebookresearch/dinov2 vision_transformer + layers, block_chunks=0
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
    "mlp.fc2.bias", "ls2.gamma",
}


def test_dinov2_layout_matches_the_official_checkpoint_names():
    vit = DINOv2(dim=64, depth=2, num_heads=1, patch=14, pos_grid=37, mlp_hidden=256)
    keys = set(vit.state_dict())
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} <= keys
    assert {k[len("blocks.0."):] for k in keys if k.startswith("blocks.0.")} == OFFICIAL_DINOV2_BLOCK_KEYS
    assert vit.state_dict()["pos_embed"].shape == (1, 1 + 37 * 37, 64)  # trained at 518 = 37 x 14


def test_dinov2_loads_from_a_local_file_and_encodes(fake_dinov2_weights, tmp_path):
    enc = DINOv2Encoder.from_checkpoint(fake_dinov2_weights)
    ref = DINOv2(dim=64, depth=2, num_heads=1, patch=14, pos_grid=4, mlp_hidden=128)
    ref.load_state_dict(torch.load(fake_dinov2_weights, weights_only=True))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(images)
    assert feats.shape == (2, 256, 64)  # 224 / 14 = 16 x 16 patch tokens
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(224, 224), mode="bicubic")
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(feats, ref(x), atol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"objective.repa.weights: .*bad.pth is not a checkpoint of tensors"):
        DINOv2Encoder.from_checkpoint(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="objective.repa.weights"):
        DINOv2Encoder.from_checkpoint(str(tmp_path / "missing.pth"))


def test_repa_objective_trains_the_projector_not_the_encoder(fake_dinov2_weights):
    cfg, model, _ = _tiny_model_and_objective(**{"objective.repa.enabled": "true", "objective.repa.weights": fake_dinov2_weights,
                                                 "objective.repa.align_block": 2})
    encoder = DINOv2Encoder.from_checkpoint(fake_dinov2_weights)
    repa = RepaAligner(encoder, model.trunk.hidden_size, align_block=2, weight=0.5)
    objective = FlowMatchingObjective(cfg.objective, cfg.model.num_classes, repa=repa)
    assert not any("encoder" in n or "vit" in n for n, _ in objective.named_parameters())  # not sharded / saved
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    out = objective(model, x0, torch.tensor([1, 2]))
    assert 0 <= out["repa"].item() <= 2
    assert torch.allclose(out["total"], out["fm"] + 0.5 * out["repa"])
    out["total"].backward()
    assert all(p.grad is not None for p in repa.projector.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None  # alignment reaches the first blocks
