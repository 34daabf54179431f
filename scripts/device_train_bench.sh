#!/usr/bin/env bash
# Device call: `uhap bench train` (one prior train step at a preset's shape).
# Needs `.whl/extra/*.whl` (grain, ml-collections, tensorflow-datasets, tensorboardX, ... for Python 3.12) carried.
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-index --no-deps --target /tmp/site .whl/extra/*.whl 2>&1 | grep -v WARNING | tail -3
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
# RASTER_BACKENDS="cuda pallas": the rasterizer backend "auto" resolves to (UHAP_RASTER_BACKEND), one run each.
for backend in ${RASTER_BACKENDS:-auto}; do
  for cfg in ${TRAIN_CONFIGS:-configs/prior.py:base}; do
    echo "== rasterizer backend $backend, $cfg"
    UHAP_RASTER_BACKEND=$backend timeout 300 python3 -m uhap_jax.cli bench train --config "$cfg" --repeats 10 2>&1 \
      | grep -v "$F" | tail -5
  done
done
