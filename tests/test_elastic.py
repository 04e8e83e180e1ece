"""Elastic resume under the real launcher: a run checkpointed by 2 processes continues on 1
(and one checkpointed by 1 continues on 2) through DeepSpeed's universal checkpoints, seeing
exactly the samples of the uninterrupted 2-process run, with losses equal to reduction-order
tolerance, under ZeRO-1, ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import LAST, at_step, metrics, run, tiny_overrides

pytestmark = pytest.mark.slow
# fp32 all-reduce over 2 ranks vs a local mean on 1: the sums differ in their last bits and
# training amplifies that a little every step; measured max relative difference over 20 steps
# ~1e-6 (loss) and ~1e-6 (EMA), so 1e-4 leaves room without hiding a real divergence (a wrong
# data order or optimizer state moves losses by percents)
RTOL = 1e-4
MID = LAST // 2  # where the world size changes


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir)}


def _assert_continues_like(clean: Path, resumed: Path, start: int, end: int) -> float:
    a, b = _rows(clean), _rows(resumed)
    assert sorted(b) == list(range(1, end + 1)), "metrics.jsonl should read like one run"
    worst = 0.0
    for s in range(start + 1, end + 1):
        assert a[s]["sample_ids"] == b[s]["sample_ids"], f"step {s} trained other samples"
        rel = abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"])
        worst = max(worst, rel)
        assert rel <= RTOL, (s, a[s]["loss"], b[s]["loss"])
    return worst


def _copy_until(src_ckpt: Path, src_run: Path, dst: Path, step: int) -> None:
    """A save folder and run folder as a run killed right after its checkpoint at `step` left them."""
    def keep(name: str) -> bool:
        digits = name.split("-ba")[1].split("-")[0].split(".")[0] if "-ba" in name else None
        return digits is None or int(digits) <= step

    shutil.copytree(src_ckpt, dst / "ckpt", ignore=lambda d, names: [n for n in names if not keep(n)])
    (dst / "run").mkdir(parents=True)
    rows = [line for line in (src_run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "run" / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def _tar_member(tar_path: Path, suffix: str):
    """A DeepSpeed file inside a rank's checkpoint tar (written by this project's own run)."""
    with tarfile.open(tar_path) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(suffix))
        return torch.load(io.BytesIO(t.extractfile(member).read()), map_location="cpu", weights_only=False)


def _ema(ckpt: Path, step: int) -> dict:
    return load_file(str(at_step(ckpt, "ema/ep*-ba{step}.safetensors", step)))


def _assert_ema_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=RTOL, atol=1e-6), k


def test_zero2_two_processes_to_one(clean_run, tiny_mds, tmp_path):
    _copy_until(clean_run["ckpt"], clean_run["run"], tmp_path, MID)
    run(tiny_overrides(tiny_mds, tmp_path / "run", str(tmp_path / "ckpt")), cwd=tmp_path, nproc=1)
    log = (tmp_path / "run.launcher.log").read_text()
    assert "elastic resume: ep" in log and "written by 2 ranks, this run has 1" in log
    worst = _assert_continues_like(clean_run["run"], tmp_path / "run", MID, LAST)
    _assert_ema_close(_ema(clean_run["ckpt"], LAST), _ema(tmp_path / "ckpt", LAST))
    assert list((tmp_path / "ckpt").glob(f"*-ba{MID}-universal.tar"))  # the conversion is cached beside its checkpoint
    print(f"max relative loss difference after 2 -> 1: {worst:.2e}")


def test_zero2_one_process_to_two(clean_run, tiny_mds, tmp_path):
    first = tmp_path / "first"
    run(tiny_overrides(tiny_mds, first / "run", str(first / "ckpt"), **{"trainer.max_duration": f"{MID}ba"}), cwd=first, nproc=1)
    _assert_continues_like(clean_run["run"], first / "run", 0, MID)  # the same data and noise on 1 process from step 1
    run(tiny_overrides(tiny_mds, first / "run", str(first / "ckpt")), cwd=first, log="resume")
    assert "written by 1 ranks, this run has 2" in (first / "resume.launcher.log").read_text()
    _assert_continues_like(clean_run["run"], first / "run", MID, LAST)
    _assert_ema_close(_ema(clean_run["ckpt"], LAST), _ema(first / "ckpt", LAST))


@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_two_processes_to_one(stage, clean_run, tiny_mds, tmp_path):
    """ZeRO-1 and ZeRO-3 train the same mathematics as the ZeRO-2 reference (to reduction order)."""
    stage_args = {"deepspeed.zero_optimization.stage": stage, "trainer.max_duration": "30ba"}
    run(tiny_overrides(tiny_mds, tmp_path / "run", str(tmp_path / "ckpt"), **stage_args), cwd=tmp_path)
    _assert_continues_like(clean_run["run"], tmp_path / "run", 0, 30)
    if stage == 3:  # partitioned: each rank's checkpoint holds about half of the fp32 master parameters
        held = [_tar_member(at_step(tmp_path / "ckpt", f"ep*-ba{{step}}-rank{r}.tar", 30), f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
                for r in (0, 1)]
        sizes = [sum(t.numel() for t in sd["optimizer_state_dict"]["fp32_flat_groups"]) for sd in held]
        total = sum(t.numel() for t in _ema(clean_run["ckpt"], 30).values())
        assert all(abs(s - total / 2) <= 0.01 * total for s in sizes), (sizes, total)
    stage_args["trainer.max_duration"] = "40ba"
    run(tiny_overrides(tiny_mds, tmp_path / "run", str(tmp_path / "ckpt"), **stage_args), cwd=tmp_path, nproc=1, log="resume")
    assert "written by 2 ranks, this run has 1" in (tmp_path / "resume.launcher.log").read_text()
    _assert_continues_like(clean_run["run"], tmp_path / "run", 30, 40)
    _assert_ema_close(_ema(clean_run["ckpt"], 40), _ema(tmp_path / "ckpt", 40))
