#!/usr/bin/env bash
# Regenerate tests/goldens/chatglm_metrics.json with ChatGLM's own metric code path (rouge_chinese, jieba,
# nltk) in a THROWAWAY venv under /tmp: reftkit reimplements rouge_chinese and does not depend on it.
# Usage: bash tests/goldens/make_chatglm_metric_goldens.sh [--out FILE]
# Env: CHATGLM_METRIC_GOLDEN_VENV (default /tmp/chatglm_metric_golden_venv), PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CHATGLM_METRIC_GOLDEN_VENV:-/tmp/chatglm_metric_golden_venv}"
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
# what ChatGLM-6B's ptuning/requirements name for its metrics (rouge_chinese, nltk, jieba), pinned; numpy for
# its np.mean
"${PIP[@]}" "rouge_chinese==1.0.3" "jieba==0.42.1" "nltk==3.10.4" "numpy==2.4.6"

cd "$HERE/../.."
exec "$VENV/bin/python" "$HERE/make_chatglm_metric_goldens.py" "$@"
