#!/usr/bin/env bash
# Create or refresh .venv/ at the repository root with the pinned stack (setup.cfg).
# Idempotent: a stamp holding the hash of the packaging files skips the install when
# nothing changed, so every README command can start with it at no cost.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.dip_scale-installed"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 13) else 1)'; then
  echo "setup_venv: need Python 3.10-3.12 (found $("$py" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# A first install needs ~7 GB in the venv (torch's CUDA build and its nvidia-* wheels) plus the
# wheels pip unpacks in TMPDIR: a full disk otherwise shows up minutes later as pip's OSError.
need_gib=8
free_gib=$(df -Pk "$root" | awk 'NR==2 {print int($4 / 1048576)}')
if [ ! -x "$venv/bin/python" ] && [ "$free_gib" -lt "$need_gib" ]; then
  echo "setup_venv: $free_gib GiB free on the disk of $root; installing into .venv needs about $need_gib GiB (torch 2.5.1's CUDA build). Free space there and run again." >&2
  exit 1
fi

echo "setup_venv: installing the pinned stack into $venv (first time: a few minutes, ~6.8 GB: torch 2.5.1 from PyPI is the CUDA build)" >&2
start=$(date +%s)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
# DS_BUILD_OPS=0: DeepSpeed builds no CUDA/C++ ops at install time (JIT on first use instead).
DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
echo "$want" > "$stamp"
echo "setup_venv: done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)" >&2
