#!/usr/bin/env bash
# Regenerate tests/goldens/adapters/ from `adapters` 1.3 in a THROWAWAY venv under /tmp.
# adapters 1.3 pins transformers ~=4.57.6, which reftkit (transformers >= 5) cannot share a venv with.
# Usage: bash tests/goldens/make_adapters_goldens.sh [--out DIR]
# Env: ADAPTERS_GOLDEN_VENV (default /tmp/adapters_golden_venv), PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ADAPTERS_GOLDEN_VENV:-/tmp/adapters_golden_venv}"
PY="${PYTHON:-python3}"

case "$VENV" in
  /tmp/*) ;;
  *) echo "refusing: venv must live under /tmp (got $VENV)" >&2; exit 1 ;;
esac
case "$VENV" in
  *..*) echo "refusing: venv path must not contain '..' (got $VENV)" >&2; exit 1 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# 1) torch FIRST with the exact pin (resolves to the CPU wheel here; unpinned pulls CUDA).
"${PIP[@]}" "torch==2.13.0"
# 2) adapters 1.3 with the transformers it pins (~=4.57.6); torch repeated so pip keeps the pin.
"${PIP[@]}" "torch==2.13.0" "adapters==1.3.0" "transformers~=4.57.6" "safetensors"

cd "$HERE/../.."
exec "$VENV/bin/python" "$HERE/make_adapters_goldens.py" "$@"
