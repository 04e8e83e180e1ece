"""The paper's GPU path, executed on CPU: DeepSpeed bf16 (bf16 parameters, fp32 master weights)
under ZeRO-2 and ZeRO-3 with REPA, EMA, checkpoints and kill -9 resume (through the test-only
switch that lifts Composer's CPU refusal); activation checkpointing; the FLOPs that MFU counts;
the GPU benchmark's CPU run. (Compiled training against the eager reference: test_elastic.py.)"""
from __future__ import annotations

import os
import subprocess
import tarfile

import pytest
import torch

from conftest import PYTHON, ROOT, TINY_MODEL, env_with_repo_on_path, tiny_config
from dip_scale import naming
from dip_scale.config import load_config
from dip_scale.models import build_model
from training_helpers import assert_ema_follows_the_master_weights, at_step, kill_when, launch, losses, run, tiny_overrides

BF16 = env_with_repo_on_path(DIP_SCALE_TEST_ONLY_CPU_BF16="1")


def _bf16_args(tiny_mds, run_dir, ckpt, dinov2, **extra):
    return tiny_overrides(tiny_mds, run_dir, str(ckpt), **{
        "deepspeed.bf16.enabled": "true", "objective.repa.enabled": "true", "objective.repa.weights": dinov2,
        "objective.repa.align_block": 2, "optimizer.lr": "1e-2", **extra})


@pytest.mark.slow
def test_bf16_zero2_trains_resumes_exactly_after_a_kill_and_exports_an_fp32_ema_that_samples(tiny_mds, tmp_path, fake_dinov2_weights):
    """Killed (-9) a few steps past its checkpoint at 10 and restarted: the steps trained again
    are bitwise the ones trained before the kill; the loss falls; the module trained in bf16; the
    EMA export is fp32 and samples finite images. (The EMA across a kill: the ZeRO-3 test.)"""
    from dip_scale.diffusion.sampler import sample
    from dip_scale.models.export import read_model_file

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"
    args = _bf16_args(tiny_mds, run_dir, ckpt, fake_dinov2_weights, **{"trainer.max_duration": "20ba", "logging.sample_interval": "20ba"})
    proc = launch(args, cwd=tmp_path, env=BF16)
    kill_when(proc, lambda: os.path.lexists(ckpt / "latest-rank1.tar") and max(losses(run_dir) or [0]) >= 13)
    before = losses(run_dir)
    assert "test-only switch: DeepSpeed bf16 on the CPU" in (tmp_path / "run.launcher.log").read_text()
    assert os.readlink(ckpt / "latest-rank0.tar").endswith("-ba10-rank0.tar") and max(before) < 20
    run(args, cwd=tmp_path, env=BF16, log="resume")
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 21)) and all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert all(loss[s] == before[s] for s in before)  # steps 11..kill, trained twice: bitwise the same
    assert sum(loss[s] for s in range(17, 21)) < 0.85 * sum(loss[s] for s in range(1, 5)), loss
    with tarfile.open(at_step(ckpt, "ep*-ba{step}-rank0.tar", 20)) as t:  # the module really trained in bf16
        member = next(m for m in t.getmembers() if m.name.endswith("mp_rank_00_model_states.pt"))
        module = torch.load(t.extractfile(member), map_location="cpu", weights_only=False)["module"]
    assert module["model.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    model, model_cfg, _ = read_model_file(str(at_step(ckpt, "ema/ep*-ba{step}.safetensors", 20)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    images = sample(model, torch.tensor([0, 1]), [0, 1], image_size=model_cfg.image_size, null_class=model_cfg.num_classes, steps=4)
    assert torch.isfinite(images).all() and images.std() > 0
    assert (run_dir / naming.grid(20)).is_file()


@pytest.mark.slow
def test_bf16_zero3_ema_is_the_fp32_average_of_the_master_weights_across_a_kill(tiny_mds, tmp_path, fake_dinov2_weights):
    """EMA_k = d EMA_(k-1) + (1 - d) W_k with W_k the fp32 master weights of step k, read back from
    each checkpoint by DeepSpeed's own zero_to_fp32, chained across a kill -9 and resume."""
    decay, ckpt, last = 0.5, tmp_path / "ckpt", 6
    args = _bf16_args(tiny_mds, tmp_path / "run", ckpt, fake_dinov2_weights, **{
        "deepspeed.zero_optimization.stage": 3, "ema.decay": decay, "trainer.max_duration": f"{last}ba", "trainer.save_interval": "1ba"})
    proc = launch(args, cwd=tmp_path, env=BF16)
    kill_when(proc, lambda: len(list(ckpt.glob("*.manifest.json"))) >= 3)
    run(args, cwd=tmp_path, env=BF16, log="resume")
    assert sorted(losses(tmp_path / "run")) == list(range(1, last + 1))
    assert_ema_follows_the_master_weights(ckpt, last, decay, tmp_path)


@pytest.mark.slow
def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    from dip_scale.models.summary import saved_activation_bytes

    cfg = tiny_config()
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = build_model(tiny_config(**{"model.activation_checkpointing": "true"}).model)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 1, 2, 3])
    for m in (plain, ckpt):
        m.train()
        m(x, t, y).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), name
    eager_bytes, ckpt_bytes = (saved_activation_bytes(m, x, t, y) for m in (plain, ckpt))
    assert ckpt_bytes < 0.75 * eager_bytes, (eager_bytes, ckpt_bytes)  # the conv head (not checkpointed) keeps the rest


@pytest.mark.slow
def test_mfu_counts_what_is_trained(fake_dinov2_weights):
    """flops_per_batch = 6 x batch x the forward MACs of the DiP and the REPA projector, for two
    presets, checked against a meta-device count of exactly those modules."""
    from torch.utils.flop_counter import FlopCounterMode

    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.diffusion.repa import DINOv2Encoder, RepaAligner
    from dip_scale.models.summary import trained_macs_per_image
    from dip_scale.training.composer_model import DiPComposerModel

    for overrides in ({"model.preset": "tiny/16", "model.image_size": 64},
                      {"model.preset": "S/32", "model.image_size": 128, "model.head.placement": "hybrid", "model.head.channels": "[16,32,64,128]"}):
        cfg = load_config(None, [f"{k}={v}" for k, v in {**overrides, "model.num_classes": 4, "logging.sample_classes": "[0]"}.items()])
        model = build_model(cfg.model)
        repa = RepaAligner(DINOv2Encoder.from_checkpoint(fake_dinov2_weights), model.trunk.hidden_size, 2, 0.5)
        cm = DiPComposerModel(model, FlowMatchingObjective(cfg.objective, 4, repa), trained_macs_per_image(cfg.model, repa))
        s = cfg.model.image_size
        with torch.device("meta"):
            meta_model = build_model(cfg.model)
            meta_projector = RepaAligner(DINOv2Encoder.from_checkpoint(fake_dinov2_weights), model.trunk.hidden_size, 2, 0.5).projector.to("meta")
        with FlopCounterMode(display=False) as counter:
            _, hidden = meta_model(torch.empty(3, 3, s, s, device="meta"), torch.empty(3, device="meta"),
                                   torch.zeros(3, dtype=torch.long, device="meta"), capture=2)
            meta_projector(hidden)
        forward_flops = sum(counter.get_flop_counts()["Global"].values())  # 2 FLOPs per MAC, batch of 3
        batch = (torch.zeros(3, 3, s, s, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
        assert cm.flops_per_batch(batch) == pytest.approx(3 * forward_flops, rel=1e-9)
        assert trained_macs_per_image(cfg.model, repa) > trained_macs_per_image(cfg.model)  # the projector counts


@pytest.mark.slow
def test_bench_gpu_runs_end_to_end_on_cpu_tiny(tiny_mds, standin_inception, tmp_path):
    # the tests' tiny model at the per-device batch the compiled run of tests/test_elastic.py trains:
    # the same graphs, so inductor's cache spares a second cold CPU compile (speed only)
    from dip_scale.models.presets import PRESETS

    model = {**TINY_MODEL, "model.depth": PRESETS[TINY_MODEL["model.preset"]].depth}
    proc = subprocess.run([PYTHON, str(ROOT / "tools" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--workdir", str(tmp_path),
                           "--data", tiny_mds, "--inception", standin_inception, "--batches", "8,4",
                           "--set", *(f"{k}={v}" for k, v in model.items())],
                          capture_output=True, text=True, env=env_with_repo_on_path(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    table = proc.stdout
    for key in ("train", "latency", "sampling", "features", "loader"):
        assert key in result and result[key], key
    assert all(v not in (None, "") for row in result["train"] for v in row.values())
    assert [(r["batch"], r["compile"]) for r in result["train"]] == [(8, False), (4, False), (8, True)]
    assert result["image_size"] == 32
    assert "img/s" in table and "MFU" in table
