#!/usr/bin/env bash
# Regenerate the stored tutorials: run each tutorials/_make/make_NN.py with --execute (the full-size
# parameters) and store the outputs. All of them by default (about 1.5 h on 2 CPU cores), or the ones named:
#   bash scripts/tutorials.sh            # 01 .. 07
#   bash scripts/tutorials.sh 02 05      # just these
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root/tutorials/_make"
if [ "$#" -eq 0 ]; then
  set -- $(ls make_[0-9][0-9].py | sed 's/make_\(..\)\.py/\1/')
fi
for n in "$@"; do
  [ -f "make_$n.py" ] || { echo "no tutorials/_make/make_$n.py (have: $(ls make_[0-9][0-9].py | tr '\n' ' '))" >&2; exit 2; }
  start=$(date +%s)
  echo "[tutorials] $n: running at full size" >&2
  "$REFTKIT_PYTHON" "make_$n.py" --execute
  echo "[tutorials] $n: stored in $(( $(date +%s) - start )) s" >&2
done
