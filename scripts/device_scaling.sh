#!/usr/bin/env bash
# 1 vs 2 GPUs on one host: the prior train step at the base preset, global batch growing with the GPU count.
# Needs `.whl/extra/*.whl` carried (see scripts/device_train_bench.sh). Run on kind nvidia-h100-x2.
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
pip install -q --no-index --no-deps --target /tmp/site .whl/extra/*.whl 2>&1 | grep -v WARNING | tail -3
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
per_gpu=${PER_GPU_FRAMES:-8}
echo "== 1 GPU"
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m uhap_jax.cli bench train --config configs/prior.py:base \
  --config.data.batch_size=$per_gpu --repeats 20 2>&1 | grep -v "$F" | tail -3
echo "== 2 GPUs"
timeout 240 python3 -m uhap_jax.cli bench train --config configs/prior.py:base \
  --config.data.batch_size=$((2 * per_gpu)) --repeats 20 2>&1 | grep -v "$F" | tail -3
