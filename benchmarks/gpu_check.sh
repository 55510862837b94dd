#!/usr/bin/env bash
# GPU check, no network: training step throughput and peak memory (ViT-B/16, RN50, batch 64,
# bf16), real training runs (data wait share, checkpoint seconds per epoch), evaluation
# speed and the whole results table timed on synthetic data; ends with one summary block.
# See benchmarks/gpu_check.py for the steps.
#   bash benchmarks/gpu_check.sh            # on the CUDA GPU
#   bash benchmarks/gpu_check.sh --compile  # also the compile: true rows
#   bash benchmarks/gpu_check.sh --cpu      # small, on the CPU (tiny model)
# The interpreter: $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# No network on the machine: never try to reach the model hubs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The environment may have been made for a checkout at another path (a venv carried to this
# machine): point its editable install of the project here first, offline.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index -e .
exec "$PYTHON" benchmarks/gpu_check.py "$@"
