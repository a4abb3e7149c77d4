#!/usr/bin/env bash
# The test command of the README: set up the venv, then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec "$REFTKIT_PYTHON" -m pytest -q "$@"
