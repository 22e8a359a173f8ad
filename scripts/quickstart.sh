#!/usr/bin/env bash
# The main job: a small adversarial lottery-ticket experiment on the real Fashion-MNIST.
# Prints the per-level table and writes plots to runs/quickstart/report/.
# Extra arguments are passed on, e.g. --config.train.num_steps=500 or --overwrite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m experiments.main --config=experiments/configs/quickstart.py \
  --workdir=runs/quickstart "$@"
