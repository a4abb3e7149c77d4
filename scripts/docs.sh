#!/usr/bin/env bash
# Build the documentation site into site/ (or wherever extra arguments say): offline, strict
# (-W: warnings are errors, -n: every cross-reference must resolve), notebooks shown as stored.
#   bash scripts/docs.sh                      # -> site/
#   bash scripts/docs.sh -o /tmp/out          # another output folder
#   bash scripts/docs.sh -o /tmp/out -- -E    # anything after -- goes to sphinx-build
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
out="$root/site"
src="$root/docs"
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    -s) src="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
# the doctree cache lives beside the site, so a rebuild only re-reads what changed
exec "$REFTKIT_PYTHON" -m sphinx -b html -W --keep-going -n -q -d "$out/.doctrees" "$src" "$out" "$@"
