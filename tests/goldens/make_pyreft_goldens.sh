#!/usr/bin/env bash
# Regenerate tests/goldens/pyreft/ from pyreft 0.1.0 in a THROWAWAY venv under /tmp.
# Usage: bash tests/goldens/make_pyreft_goldens.sh [--cases all|classes|styles]
# Env: PYREFT_GOLDEN_VENV (default /tmp/pyreft_golden_venv), PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PYREFT_GOLDEN_VENV:-/tmp/pyreft_golden_venv}"
PY="${PYTHON:-python3}"

case "$VENV" in
  /tmp/*) ;;
  *) echo "refusing: venv must live under /tmp (got $VENV)" >&2; exit 1 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# 1) torch FIRST with the exact pin (resolves to the CPU wheel here; unpinned pulls CUDA).
"${PIP[@]}" "torch==2.13.0"
# 2) what pyreft/pyvene actually need at import time (pyreft 0.1.0 declares a huge,
#    partly conflicting dependency list: jupyter, wandb, ydata-profiling, seaborn==0.12.2, ...).
"${PIP[@]}" "torch==2.13.0" "transformers==4.45.1" "safetensors==0.8.0" "numpy==2.4.6" \
  "tqdm" "datasets" "networkx" "matplotlib" "accelerate==1.0.1" \
  "peft==0.21.2"  # accelerate: Trainer (bench_recipe); peft: tests/pyreft_compat pattern 8 run with --real
# 3) pyreft + pyvene without their declared deps (pyreft 0.1.0 requires pyvene>=0.1.7).
"${PIP[@]}" --no-deps "pyreft==0.1.0" "pyvene==0.1.8"

cd "$HERE/../.."
# from_pyreft goldens (pyreft/; --cases picks a subset), then reftkit.pyreft's: its data modules and datasets
# (pyreft_data/, tests/pyreft_compat/test_compat_data.py) and its model and trainers (pyreft_compat/,
# tests/pyreft_compat/test_compat_parity.py)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$VENV/bin/python" "$HERE/make_pyreft_goldens.py" "$@"
"$VENV/bin/python" "$HERE/make_pyreft_data_goldens.py"
"$VENV/bin/python" "$HERE/make_pyreft_compat_goldens.py"
