"""Launch real training runs (the `composer` launcher, 2 processes on gloo) and read what they
leave behind: metrics.jsonl, checkpoints, EMA exports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import ROOT, TINY_MODEL, env_with_repo_on_path, launcher_command

TRAIN = ROOT / "dip_scale" / "train.py"
TINY = ROOT / "yamls" / "dip_tiny_cpu.yaml"
LAST = 60  # steps of the resume tests (tiny_overrides' max_duration), checkpoints every 10; the S3 kill
# tests need the room: the first upload (Composer's uploader processes start) can take ~5 s


def tiny_overrides(data: str, run_dir: Path, save_folder: str, **extra) -> list[str]:
    base = {
        "run_name": "t",
        "run_dir": str(run_dir),
        **{k: v for k, v in TINY_MODEL.items() if k != "model.preset"},  # the YAML's preset is tiny/16
        "data.remote": data,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "optimizer.warmup": "0ba",
        "trainer.max_duration": f"{LAST}ba",
        "trainer.save_folder": save_folder,
        "trainer.save_interval": "10ba",
        "trainer.progress_bar": "false",
        "trainer.console_log_interval": "1000ba",
        "logging.metrics_interval": "1ba",
        "logging.sample_ids": "true",  # the data order, for the resume tests
        "logging.sample_interval": "1000ba",
        "logging.sample_classes": "[0,1,2,3]",
        "sampler.steps": 4,
        "eval.backend": "none",  # the eval tests switch it on
        "data.num_canonical_nodes": 2,  # the global sample order is then the same on 1 or 2 "nodes"
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(overrides, *, cwd: Path, env=None, nproc: int = 2, node: tuple[int, int] | None = None, port: int | None = None, log: str = "run",
           module: bool = False):
    """Start `composer -n nproc dip_scale/train.py tiny.yaml overrides` in its own process group
    (module=True: `composer -n nproc -m dip_scale.train ...`). node=(node_rank, world_size) runs
    one "node" of a multi-node job."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = launcher_command(nproc, port, log_dir=cwd, log=f"{log}-rank")
    env = dict(env or env_with_repo_on_path())
    if node is not None:
        cmd += ["--world_size", str(node[1]), "--node_rank", str(node[0]), "--master_addr", "127.0.0.1"]
    cmd += ["-m", "dip_scale.train"] if module else [str(TRAIN)]
    cmd += [str(TINY), *overrides]
    if node is not None:
        # a "node" is a machine of its own: private /dev/shm (mount namespace) and temp folder, so
        # nothing but the network and S3 is shared with the other node
        (cwd / "tmp").mkdir(exist_ok=True)
        env["TMPDIR"] = str(cwd / "tmp")
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node", *cmd]
    out = open(cwd / f"{log}.launcher.log", "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc, timeout: int = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run(overrides, *, cwd: Path, env=None, timeout: int = 600, **kw) -> None:
    proc = launch(overrides, cwd=cwd, env=env, **kw)
    rc = wait(proc, timeout)
    assert rc == 0, logs(cwd)


def kill_when(proc, condition, timeout: int = 300) -> None:
    """SIGKILL the whole launch (launcher and ranks) as soon as condition() holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before the kill point")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def logs(cwd: Path) -> str:
    parts = []
    for p in sorted(Path(cwd).glob("*.err")) + sorted(Path(cwd).glob("*.launcher.log")):
        parts.append(f"----- {p.name}\n{p.read_text()[-4000:]}")
    return "\n".join(parts)


class FlakyProxy:
    """A TCP proxy in front of the S3 server that can go down (drop every connection) on demand,
    and notices when a checkpoint upload (a PUT of a .tar) starts."""

    def __init__(self, target_port: int):
        import socket

        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.down = threading.Event()
        self.upload_seen = threading.Event()
        self.dropped = 0
        self._conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            client, _ = self.sock.accept()
            if self.down.is_set():
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self._conns.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, from_client):
        try:
            while True:
                data = src.recv(65536)
                if not data or self.down.is_set():
                    break
                if from_client and data.startswith(b"PUT ") and b".tar" in data.split(b"\r\n", 1)[0]:
                    self.upload_seen.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def outage(self, seconds: float):
        """Go down (refuse and cut every connection) for `seconds`."""
        self.down.set()
        for a, b in list(self._conns):
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
        time.sleep(seconds)
        self.down.clear()


def at_step(folder: Path, pattern: str, step: int) -> Path:
    """The one file in folder matching pattern with '{step}' filled, e.g. 'ema/ep*-ba{step}.safetensors'."""
    found = list(Path(folder).glob(pattern.format(step=step)))
    assert len(found) == 1, (folder, pattern, step, found)
    return found[0]


def copy_run_until(src_ckpt: Path, src_run: Path, dst: Path, step: int) -> None:
    """dst/ckpt and dst/run as a run killed right after its checkpoint at `step` left them (the
    checkpoints up to it, metrics.jsonl up to it): what a resume reads, without a launch to kill."""
    import shutil

    def keep(name: str) -> bool:
        digits = name.split("-ba")[1].split("-")[0].split(".")[0] if "-ba" in name else None
        return digits is None or int(digits) <= step

    shutil.copytree(src_ckpt, dst / "ckpt", ignore=lambda d, names: [n for n in names if not keep(n)])
    (dst / "run").mkdir(parents=True)
    rows = [line for line in (src_run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "run" / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def assert_matches_clean(clean_run: dict, resumed_run: Path, resumed_ema, resumed_from: int, last: int = LAST) -> None:
    """Losses after the resume point and the EMA export at `last` equal the uninterrupted run's
    (bitwise); metrics.jsonl reads like one run. `resumed_ema`: a path or the file's bytes."""
    import torch
    from safetensors.torch import load, load_file

    a, b = losses(clean_run["run"]), losses(resumed_run)
    assert sorted(b) == list(range(1, last + 1)), "metrics.jsonl should read like one uninterrupted run"
    assert all(a[s] == b[s] for s in range(resumed_from + 1, last + 1)), "losses after the resume point differ"
    ea = load_file(str(at_step(clean_run["ckpt"], "ema/ep*-ba{step}.safetensors", last)))
    eb = load_file(str(resumed_ema)) if isinstance(resumed_ema, Path) else load(resumed_ema)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), "final EMA differs"


def assert_ema_follows_the_master_weights(ckpt: Path, last: int, decay: float, workdir: Path) -> None:
    """EMA_k = d * EMA_(k-1) + (1 - d) * W_k for k = 2..last (a checkpoint every step), with W_k the
    fp32 master weights of step k read back from the rank tars by DeepSpeed's own zero_to_fp32
    (independent of this project's EMA code); the exported EMA is fp32 and moves every step."""
    import tarfile

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ema = {k: load_file(str(at_step(ckpt, "ema/ep*-ba{step}.safetensors", k))) for k in range(1, last + 1)}
    ref = ema[1]
    for k in range(2, last + 1):
        merged = workdir / f"merged{k}"
        for r in (0, 1):
            with tarfile.open(at_step(ckpt, f"ep*-ba{{step}}-rank{r}.tar", k)) as t:
                t.extractall(merged)
        weights = get_fp32_state_dict_from_zero_checkpoint(str(merged), tag="deepspeed")
        w = {name[len("model."):]: v for name, v in weights.items() if name.startswith("model.")}
        assert w.keys() == ref.keys() and all(v.dtype == torch.float32 for v in [*w.values(), *ema[k].values()])
        ref = {n: ref[n].mul(decay).add(w[n], alpha=1 - decay) for n in ref}
        assert all(torch.equal(ref[n], ema[k][n]) for n in ref), f"EMA at step {k} differs from the fp32 reference"
        assert any(not torch.equal(ema[k][n], ema[k - 1][n]) for n in ref)  # it did move
