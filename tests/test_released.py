"""Importing the released DiP: a released-format checkpoint built here from the documented names
and shapes, an independent forward of the released architecture written here (its conventions:
r = 1 - t, r = 0 is noise, prediction x0 - eps), and the importer held against both."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import PYTHON, ROOT, env_with_repo_on_path
from dip_scale.models.spec import load_model_config
from dip_scale.models import build_model
from dip_scale.models.blocks import TimestepEmbedder
from dip_scale.models.export import load_model_file, read_model_file
from dip_scale.models.released import ReleasedCheckpointError, map_released, read_checkpoint, select_weights, time_fold

TOOL = ROOT / "tools" / "import_released_checkpoint.py"
PAPER_YAML = ROOT / "yamls" / "dip_xl16_600ep.yaml"
SMALL = dict(depth=2, dim=64, heads=2, classes=10)  # head dim 32; the decoder is the released one (64..512)


def small_overrides(image: int = 64, patch: int = 16) -> list[str]:
    return [f"model.preset=tiny/{patch}", f"model.depth={SMALL['depth']}", f"model.hidden_size={SMALL['dim']}",
            f"model.num_heads={SMALL['heads']}", f"model.image_size={image}", f"model.num_classes={SMALL['classes']}"]


# ------------------------------------------------------------------------------------------
# The released layout, written from the documented architecture (not from its code)
# ------------------------------------------------------------------------------------------
def released_shapes(depth: int, dim: int, heads: int, classes: int, patch: int = 16, proj_out: int | None = None) -> dict[str, tuple]:
    """Name -> shape of every tensor of a released DiP Lightning state dict's `denoiser.` part
    (and, with proj_out, the REPA projector of `diffusion_trainer.`)."""
    ffn = int(2 * 4 * dim / 3)
    s = {"s_embedder.proj.weight": (dim, 3 * patch * patch), "s_embedder.proj.bias": (dim,),
         "t_embedder.mlp.0.weight": (dim, 256), "t_embedder.mlp.0.bias": (dim,),
         "t_embedder.mlp.2.weight": (dim, dim), "t_embedder.mlp.2.bias": (dim,),
         "y_embedder.embedding_table.weight": (classes + 1, dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (dim,), b + "norm2.weight": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                  b + "attn.q_norm.weight": (dim // heads,), b + "attn.k_norm.weight": (dim // heads,),
                  b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                  b + "mlp.w1.weight": (ffn, dim), b + "mlp.w3.weight": (ffn, dim), b + "mlp.w2.weight": (dim, ffn),
                  b + "adaLN_modulation.0.weight": (6 * dim, dim), b + "adaLN_modulation.0.bias": (6 * dim,)})
    chans = [3, 64, 128, 256, 512]
    for k in range(1, 5):
        s[f"local_decoder.enc{k}.0.weight"] = (chans[k], chans[k - 1], 3, 3)
        s[f"local_decoder.enc{k}.0.bias"] = (chans[k],)
    s["local_decoder.bottleneck.0.weight"] = (512, 512 + dim, 1, 1)
    s["local_decoder.bottleneck.0.bias"] = (512,)
    for k, (c_in, c_out) in zip((4, 3, 2, 1), ((512, 256), (256, 128), (128, 64), (64, 64))):
        s[f"local_decoder.up{k}.weight"] = (c_in, c_in, 2, 2)  # ConvTranspose2d(c, c, 2, stride 2): (in, out, k, k)
        s[f"local_decoder.up{k}.bias"] = (c_in,)
        s[f"local_decoder.dec{k}.0.weight"] = (c_out, 2 * c_in, 3, 3)
        s[f"local_decoder.dec{k}.0.bias"] = (c_out,)
    s["local_decoder.out_conv.weight"] = (3, 64, 1, 1)
    s["local_decoder.out_conv.bias"] = (3,)
    if proj_out:
        s.update({"proj.0.0.weight": (dim, dim), "proj.0.0.bias": (dim,), "proj.0.2.weight": (dim, dim), "proj.0.2.bias": (dim,),
                  "proj.0.4.weight": (proj_out, dim), "proj.0.4.bias": (proj_out,)})
    return s


def released_tensors(depth=SMALL["depth"], dim=SMALL["dim"], heads=SMALL["heads"], classes=SMALL["classes"], patch=16, seed=0):
    """Random released-format tensors at the scale of a default-initialised network."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_shapes(depth, dim, heads, classes, patch).items():
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif "embedding_table" in name:
            out[name] = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            if ".up" in name and len(shape) == 4:  # ConvTranspose2d weights are (in, out, k, k): fan-in is out * k * k
                fan_in = shape[1] * shape[2] * shape[3]
            # He-uniform: signals keep their scale through the decoder's eight layers, so the
            # output depends on the trunk's token (with PyTorch's default scale it would not)
            out[name] = (torch.rand(shape, generator=g) * 2 - 1) * math.sqrt(6 / fan_in)
    return out


def released_forward(w: dict, x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, depth: int, heads: int, patch: int = 16):
    """The released DiP's forward, functional, in its own conventions: r = 0 is noise, the output
    is x0 - eps. Complex-number RoPE at linspace(0, 16, n) with x/y pairs interleaved.
    -> (output, the trunk's last hidden state)."""
    b, c, hgt, wid = x.shape
    gh, gw = hgt // patch, wid // patch
    n = gh * gw
    dim = w["s_embedder.proj.weight"].shape[0]
    dh = dim // heads
    pix = F.unfold(x, patch, stride=patch).transpose(1, 2)  # (B, N, 3 p p)

    freqs = torch.exp(-math.log(10) * torch.arange(128, dtype=torch.float32) / 128)
    ang = r[:, None].float() * freqs
    te = F.linear(torch.cat([ang.cos(), ang.sin()], -1), w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])
    te = F.linear(F.silu(te), w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])[:, None]
    cond = F.silu(te + w["y_embedder.embedding_table.weight"][y][:, None])

    yy, xx = torch.meshgrid(torch.linspace(0, 16, gh), torch.linspace(0, 16, gw), indexing="ij")
    rope_f = 1.0 / 10000 ** (torch.arange(0, dh, 4).float() / dh)
    cis = torch.stack([torch.polar(torch.ones(n, dh // 4), torch.outer(xx.flatten(), rope_f)),
                       torch.polar(torch.ones(n, dh // 4), torch.outer(yy.flatten(), rope_f))], dim=-1).reshape(n, dh // 2)

    def rms(v, weight):
        return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rotate(v):  # (B, N, H, dh)
        return torch.view_as_real(torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2)) * cis[None, :, None]).flatten(3)

    s = F.linear(pix, w["s_embedder.proj.weight"], w["s_embedder.proj.bias"])
    for i in range(depth):
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = F.linear(cond, w[p + "adaLN_modulation.0.weight"], w[p + "adaLN_modulation.0.bias"]).chunk(6, -1)
        h = rms(s, w[p + "norm1.weight"]) * (1 + sc1) + sh1
        q, k, v = F.linear(h, w[p + "attn.qkv.weight"]).reshape(b, n, 3, heads, dh).unbind(2)
        q, k = rotate(rms(q, w[p + "attn.q_norm.weight"])), rotate(rms(k, w[p + "attn.k_norm.weight"]))
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(b, n, dim)
        s = s + g1 * F.linear(att, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = rms(s, w[p + "norm2.weight"]) * (1 + sc2) + sh2
        s = s + g2 * F.linear(F.silu(F.linear(h, w[p + "mlp.w1.weight"])) * F.linear(h, w[p + "mlp.w3.weight"]), w[p + "mlp.w2.weight"])
    hidden = s
    s = F.silu(te + s)

    d = "local_decoder."

    def conv(v, name):
        return F.silu(F.conv2d(v, w[f"{d}{name}.0.weight"], w[f"{d}{name}.0.bias"], padding=1))

    def up(v, name):
        return F.conv_transpose2d(v, w[f"{d}{name}.weight"], w[f"{d}{name}.bias"], stride=2)

    e1 = conv(pix.reshape(b * n, c, patch, patch), "enc1")
    e2 = conv(F.max_pool2d(e1, 2), "enc2")
    e3 = conv(F.max_pool2d(e2, 2), "enc3")
    e4 = conv(F.max_pool2d(e3, 2), "enc4")
    token = s.reshape(b * n, dim, 1, 1).repeat(1, 1, patch // 16, patch // 16)
    z = F.silu(F.conv2d(torch.cat([F.max_pool2d(e4, 2), token], 1), w[d + "bottleneck.0.weight"], w[d + "bottleneck.0.bias"]))
    z = conv(torch.cat([up(z, "up4"), e4], 1), "dec4")
    z = conv(torch.cat([up(z, "up3"), e3], 1), "dec3")
    z = conv(torch.cat([up(z, "up2"), e2], 1), "dec2")
    z = conv(torch.cat([up(z, "up1"), e1], 1), "dec1")
    out = F.conv2d(z, w[d + "out_conv.weight"], w[d + "out_conv.bias"])
    return F.fold(out.reshape(b, n, -1).transpose(1, 2), (hgt, wid), patch, stride=patch), hidden


def lightning_checkpoint(path, ema: dict, online: dict, projector: dict | None = None, **extra) -> None:
    """A Lightning-style .ckpt: `state_dict` with denoiser / ema_denoiser / diffusion_trainer parts."""
    sd = {**{f"denoiser.{k}": v for k, v in online.items()}, **{f"ema_denoiser.{k}": v for k, v in ema.items()}}
    sd.update({f"diffusion_trainer.{k}": v for k, v in (projector or {}).items()})
    torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "2.4.0", "state_dict": sd, **extra}, path)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------
def test_time_fold_is_the_exact_rotation_of_the_sinusoid():
    emb = TimestepEmbedder(8)
    t = torch.rand(64, dtype=torch.float32)
    w = torch.randn(8, 256)
    lhs = emb.features(1 - t) @ w.T  # the released net's first time layer at r = 1 - t
    rhs = emb.features(t) @ time_fold(w, emb.frequencies()).T  # ours at t, folded weight
    assert (lhs - rhs).abs().max() < 1e-6 * max(1.0, lhs.abs().max().item()) * 10
    assert (emb.features(1 - t).double() - _rotated(emb.features(t).double(), emb.frequencies())).abs().max() < 1e-6


def _rotated(features: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    c, s = features.chunk(2, dim=-1)
    cf, sf = freqs.double().cos(), freqs.double().sin()
    return torch.cat([cf * c + sf * s, sf * c - cf * s], dim=-1)


@pytest.mark.parametrize("image, patch", [(64, 16), (256, 16), (64, 32)])
def test_imported_model_reproduces_the_released_forward(image, patch):
    w = released_tensors(patch=patch, seed=image + patch)
    model_cfg = load_model_config(str(PAPER_YAML), small_overrides(image, patch))
    state, mapping = map_released(w, model_cfg)
    model = build_model(model_cfg).eval()
    model.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, image, image, generator=g)
    t = torch.tensor([0.13, 0.87])
    y = torch.tensor([3, SMALL["classes"]])  # a class and the null label
    with torch.no_grad():
        ours, ours_hidden = model(x, t, y, capture=SMALL["depth"])
        theirs, hidden = released_forward(w, x, 1 - t, y, SMALL["depth"], SMALL["heads"], patch)
        # the comparison is sharp: a trunk that differs a little (one attention weight scaled by
        # 1.01) moves the output far beyond the tolerance
        nudged = dict(w, **{"blocks.0.attn.qkv.weight": w["blocks.0.attn.qkv.weight"] * 1.01})
        assert (released_forward(nudged, x, 1 - t, y, SMALL["depth"], SMALL["heads"], patch)[0] - theirs).abs().max() > 1e-3
    assert theirs.abs().mean() > 0.05  # a live network, not a near-zero output
    assert torch.allclose(ours_hidden, hidden, rtol=1e-5, atol=1e-4)  # RoPE, attention, MLP, modulation as released
    assert (ours + theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())  # ours predicts eps - x0, theirs x0 - eps
    assert set(src for s in mapping.values() for src in s) == set(w)


@pytest.mark.slow
def test_the_tool_imports_a_lightning_checkpoint_and_sampling_runs_on_it(tmp_path):
    ema, online = released_tensors(seed=1), released_tensors(seed=2)
    shapes = released_shapes(SMALL["depth"], SMALL["dim"], SMALL["heads"], SMALL["classes"], proj_out=32)
    projector = {k: torch.randn(shape) * 0.1 for k, shape in shapes.items() if k.startswith("proj.")}
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt, ema, online, projector)
    out = tmp_path / "dip.safetensors"
    env = env_with_repo_on_path()
    proc = subprocess.run([PYTHON, str(TOOL), str(ckpt), str(PAPER_YAML), *small_overrides(), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["weights"] == "ema_denoiser" and summary["repa_projector"] is True
    model, model_cfg, meta = read_model_file(str(out))
    assert meta["source_sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert json.loads(meta["mapping"])["blocks.0.mlp.w12.weight"] == ["blocks.0.mlp.w1.weight", "blocks.0.mlp.w3.weight"]
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], ema["blocks.1.attn.qkv.weight"])  # ema, not online
    _, aux, _, _ = load_model_file(str(out))
    assert set(aux) == {f"repa_projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert torch.equal(aux["repa_projector.4.weight"], projector["proj.0.4.weight"])

    online_out = tmp_path / "online.safetensors"
    proc = subprocess.run([PYTHON, str(TOOL), str(ckpt), str(PAPER_YAML), *small_overrides(), "--out", str(online_out),
                           "--weights", "online"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    online_model, _, _ = read_model_file(str(online_out))
    assert torch.equal(online_model.state_dict()["blocks.1.attn.qkv.weight"], online["blocks.1.attn.qkv.weight"])

    grid = tmp_path / "grid.png"
    proc = subprocess.run([PYTHON, str(ROOT / "tools" / "sample.py"), str(out), "--classes", "1,2", "--steps", "3", "--out", str(grid)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert grid.stat().st_size > 0


def _tool_error(tmp_path, ckpt, *extra) -> str:
    proc = subprocess.run([PYTHON, str(TOOL), str(ckpt), str(PAPER_YAML), *small_overrides(), "--out", str(tmp_path / "o.safetensors"), *extra],
                          capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.safetensors").exists()
    return proc.stderr


@pytest.mark.slow
def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    w = released_tensors()
    model_cfg = load_model_config(str(PAPER_YAML), small_overrides())
    missing = dict(w)
    del missing["blocks.1.mlp.w3.weight"]
    with pytest.raises(ReleasedCheckpointError, match=r"missing tensor blocks\.1\.mlp\.w3\.weight \(for blocks\.1\.mlp\.w12\.weight\)"):
        map_released(missing, model_cfg)
    extra = dict(w, **{"blocks.2.norm1.weight": torch.ones(SMALL["dim"])})
    with pytest.raises(ReleasedCheckpointError, match=r"unexpected tensors .*blocks\.2\.norm1\.weight"):
        map_released(extra, model_cfg)
    bad = dict(w, **{"local_decoder.bottleneck.0.weight": torch.zeros(512, 100, 1, 1)})
    with pytest.raises(ReleasedCheckpointError, match=r"shape mismatch for head\.bottleneck\.0\.weight.*\(512, 100, 1, 1\)"):
        map_released(bad, model_cfg)
    # through the tool: a checkpoint of another depth, and a config the release has no tensors for
    ckpt = tmp_path / "deep.ckpt"
    lightning_checkpoint(ckpt, released_tensors(depth=3), released_tensors(depth=3))
    assert "unexpected tensors" in _tool_error(tmp_path, ckpt) and "blocks.2." in _tool_error(tmp_path, ckpt)
    ok = tmp_path / "ok.ckpt"
    lightning_checkpoint(ok, w, w)
    assert "no counterpart" in _tool_error(tmp_path, ok, "model.head.type=none")
    assert "final_layer" in _tool_error(tmp_path, ok, "model.head.type=none")
    stray = tmp_path / "stray.ckpt"
    torch.save({"state_dict": {**{f"ema_denoiser.{k}": v for k, v in w.items()}, "vae.scale": torch.ones(1)}}, stray)
    assert "vae.scale" in _tool_error(tmp_path, stray)
    only_online = tmp_path / "online_only.ckpt"
    torch.save({"state_dict": {f"denoiser.{k}": v for k, v in w.items()}}, only_online)
    assert "no ema_denoiser.* tensors" in _tool_error(tmp_path, only_online)


class _Planted:
    """An object whose unpickling would run code: it must never be unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_objects_is_refused_with_the_way_out(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "planted.ckpt"
    w = released_tensors()
    torch.save({"state_dict": {f"ema_denoiser.{k}": v for k, v in w.items()}, "hyper_parameters": _Planted(marker)}, ckpt)
    err = _tool_error(tmp_path, ckpt)
    assert str(ckpt) in err and "never unpickles" in err and "safetensors" in err
    assert not marker.exists()
    # the way out the message gives works: a safetensors file of the same state dict
    sd = {f"ema_denoiser.{k}": v.contiguous() for k, v in w.items()}
    save_file(sd, str(tmp_path / "planted.safetensors"))
    tensors = read_checkpoint(str(tmp_path / "planted.safetensors"))
    chosen, _, prefix = select_weights(tensors, "ema", "x")
    assert prefix == "ema_denoiser." and set(chosen) == set(w)


def test_xl16_maps_every_released_tensor_on_the_meta_device():
    with torch.device("meta"):
        w = {k: torch.empty(s) for k, s in released_shapes(26, 1152, 16, 1000).items()}
    assert sum(v.numel() for v in w.values()) == 631_989_411  # the released DiP-XL/16
    state, mapping = map_released(w, load_model_config(str(PAPER_YAML)))
    assert sum(v.numel() for v in state.values()) == 631_989_411 and len(mapping) == len(w) - 26  # w1 + w3 -> w12


# ------------------------------------------------------------------------------------------
# Fine-tuning from an imported file
# ------------------------------------------------------------------------------------------
def _import_small(tmp_path, image: int, classes: int, proj_out: int) -> str:
    ema = released_tensors(classes=classes, seed=5)
    shapes = released_shapes(SMALL["depth"], SMALL["dim"], SMALL["heads"], classes, proj_out=proj_out)
    projector = {k: torch.randn(s, generator=torch.Generator().manual_seed(6)) * 0.1 for k, s in shapes.items() if k.startswith("proj.")}
    ckpt = tmp_path / "released.ckpt"
    lightning_checkpoint(ckpt, ema, released_tensors(classes=classes, seed=7), projector)
    out = tmp_path / "imported.safetensors"
    overrides = small_overrides(image) + [f"model.num_classes={classes}"]
    proc = subprocess.run([PYTHON, str(TOOL), str(ckpt), str(PAPER_YAML), *overrides, "--out", str(out)],
                          capture_output=True, text=True, env=env_with_repo_on_path(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def test_init_from_loads_the_model_and_the_repa_projector(tmp_path, fake_dinov2_weights):
    from dip_scale.config import load_config
    from dip_scale.diffusion.flow import FlowMatchingObjective
    from dip_scale.diffusion.repa import DINOv2Encoder, RepaAligner
    from dip_scale.training.composer_model import DiPComposerModel
    from dip_scale.training.init_from import load_init_weights

    path = _import_small(tmp_path, 32, 4, proj_out=64)  # the fake DINOv2 is 64 wide
    cfg = load_config(str(PAPER_YAML), small_overrides(32) + ["model.num_classes=4", "objective.repa.align_block=2",
                                                              "logging.sample_classes=[0]"])
    model = build_model(cfg.model)
    repa = RepaAligner(DINOv2Encoder.from_checkpoint(fake_dinov2_weights), SMALL["dim"], 2, 0.5)
    cm = DiPComposerModel(model, FlowMatchingObjective(cfg.objective, 4, repa), 1.0)
    full = load_init_weights(path, cm, cfg.model)
    weights, aux, _, _ = load_model_file(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(repa.projector[4].weight, aux["repa_projector.4.weight"])
    assert set(full) == {f"model.{k}" for k in weights} | {f"objective.repa.projector.{k[len('repa_projector.'):]}" for k in aux}
    other = load_config(str(PAPER_YAML), small_overrides(32) + ["model.num_classes=5", "objective.repa.align_block=2", "logging.sample_classes=[0]"])
    with pytest.raises(Exception, match=r"another architecture.*num_classes: 4 != 5"):
        load_init_weights(path, DiPComposerModel(build_model(other.model), FlowMatchingObjective(other.objective, 5), 1.0), other.model)


@pytest.mark.slow
def test_finetune_from_an_imported_file_starts_there_and_resumes_bitwise(tiny_mds, tmp_path, fake_dinov2_weights):
    from safetensors.torch import load_file

    from training_helpers import copy_run_until, losses, run, tiny_overrides

    path = _import_small(tmp_path, 32, 4, proj_out=64)
    extra = {"model.depth": SMALL["depth"], "model.hidden_size": SMALL["dim"], "model.num_heads": SMALL["heads"],
             "model.head.channels": "[64,128,256,512]", "trainer.init_from": path, "trainer.max_duration": "20ba",
             "objective.repa.enabled": "true", "objective.repa.weights": fake_dinov2_weights, "objective.repa.align_block": 2}
    clean = tmp_path / "clean"
    run(tiny_overrides(tiny_mds, clean / "run", str(clean / "ckpt"), **extra), cwd=clean)
    start = load_file(str(clean / "ckpt" / "ema" / "ep0-ba0.safetensors"))
    imported, _, _, _ = load_model_file(path)
    assert start.keys() == imported.keys() and all(torch.equal(start[k], imported[k]) for k in start)
    assert not torch.equal(load_file(str(next((clean / "ckpt" / "ema").glob("*-ba20.safetensors"))))["head.out.weight"], imported["head.out.weight"])

    resumed = tmp_path / "resumed"  # as a run killed after its checkpoint at 10 leaves it (kill -9 itself: test_training.py)
    copy_run_until(clean / "ckpt", clean / "run", resumed, 10)
    run(tiny_overrides(tiny_mds, resumed / "run", str(resumed / "ckpt"), **extra), cwd=resumed, log="resume")
    assert "trainer.init_from (" in (resumed / "resume.launcher.log").read_text()  # said it is not used
    a, b = losses(clean / "run"), losses(resumed / "run")
    assert sorted(b) == list(range(1, 21)) and all(a[s] == b[s] for s in range(11, 21))
    ea, eb = (load_file(str(next((d / "ckpt" / "ema").glob("*-ba20.safetensors")))) for d in (clean, resumed))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
