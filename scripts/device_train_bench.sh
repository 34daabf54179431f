#!/usr/bin/env bash
# Device call: `uhap bench train` (one prior train step at a preset's shape) plus the rasterizer check.
# Needs `.whl/extra/*.whl` (grain, ml-collections, tensorflow-datasets, tensorboardX, ... for Python 3.12) carried.
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-index --no-deps --target /tmp/site .whl/extra/*.whl 2>&1 | grep -v WARNING | tail -3
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
for cfg in ${TRAIN_CONFIGS:-configs/prior.py:base}; do
  timeout 300 python3 -m uhap_jax.cli bench train --config "$cfg" --repeats 10 2>&1 | grep -v "$F" | tail -5
done
