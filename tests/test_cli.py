"""Every entry point answers `--help` with its usage and exit 0: the console scripts declared in
setup.cfg, the `python tools/<name>.py` forms, the training entry in its script and module forms,
and the installed console-script binaries themselves."""
from __future__ import annotations

import configparser
import importlib
import runpy
import subprocess
import sys

import pytest

from conftest import BIN, PYTHON, ROOT, env_with_repo_on_path


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


SCRIPTS = _console_scripts()
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))


def _exit_code(fn) -> int:
    try:
        fn()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_prints_its_usage(name, capsys, monkeypatch):
    module, func = SCRIPTS[name].split(":")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    assert _exit_code(getattr(importlib.import_module(module), func)) == 0
    assert capsys.readouterr().out.startswith("usage: "), name


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_prints_its_usage(tool, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [tool, "--help"])
    assert _exit_code(lambda: runpy.run_path(str(ROOT / "tools" / tool), run_name="__main__")) == 0
    assert capsys.readouterr().out.startswith("usage: "), tool


@pytest.mark.slow
def test_the_training_entry_explains_itself_in_every_form():
    """`--help` prints the launcher forms and the config syntax; no arguments is a usage error (2)."""
    forms = [[PYTHON, str(ROOT / "dip_scale" / "train.py")], [PYTHON, "-m", "dip_scale.train"], [str(BIN / "dip-train")],
             [str(BIN / "composer"), "-n", "1", "-m", "dip_scale.train"]]
    for form in forms:
        proc = subprocess.run([*form, "--help"], capture_output=True, text=True, env=env_with_repo_on_path(), cwd=ROOT.parent, timeout=120)
        assert proc.returncode == 0, (form, proc.stderr[-2000:])
        assert "composer -n GPUS -m dip_scale.train" in proc.stdout and "key.path=value" in proc.stdout, form
    proc = subprocess.run([PYTHON, str(ROOT / "dip_scale" / "train.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_console_script_binaries_are_installed():
    for name in SCRIPTS:
        assert (BIN / name).exists(), f"{name}: not installed (bash tools/setup_venv.sh installs setup.cfg's console scripts)"
    proc = subprocess.run([str(BIN / "dip-convert"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dip-convert")
