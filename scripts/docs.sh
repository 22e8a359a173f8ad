#!/usr/bin/env bash
# The API reference of the library, built offline from its docstrings with pdoc:
#   bash scripts/docs.sh [OUTPUT_DIR]      # default docs/api; open OUTPUT_DIR/index.html
# Needs the extra `docs` (pip install -e .[docs]). The engine (sparse_robust.runs) is left out:
# it is driven by configs, not imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${1:-docs/api}"
"$PYTHON" -m pdoc --docformat google --no-show-source -o "$OUT" sparse_robust '!sparse_robust.runs'
echo "API reference: $OUT/index.html"
