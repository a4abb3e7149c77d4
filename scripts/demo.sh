#!/usr/bin/env bash
# The demo command of the README: set up the venv, then train LoReFT on the embedded SmolLM2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec "$REFTKIT_PYTHON" -m reftkit demo "$@"
