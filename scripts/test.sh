#!/usr/bin/env bash
# Runs the test suite (installs everything first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -n auto -q "$@" tests
