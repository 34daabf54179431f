#!/usr/bin/env bash
# Weak scaling on one host: the prior train step at the base preset on 1, 2, 4, ... GPUs, global batch growing with
# the GPU count (PER_GPU_FRAMES frames x 4 views per GPU). Needs `.whl/extra/*.whl` carried
# (see scripts/device_train_bench.sh). Run on a several-GPU kind (nvidia-h100-x2, -x4, -x8).
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
pip install -q --no-index --no-deps --target /tmp/site .whl/extra/*.whl 2>&1 | grep -v WARNING | tail -3
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
per_gpu=${PER_GPU_FRAMES:-8}
total=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
for n in ${GPU_COUNTS:-1 2 4 8}; do
  [ "$n" -le "$total" ] || continue
  echo "== $n GPU(s)"
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout 200 python3 -m uhap_jax.cli bench train \
    --config configs/prior.py:base --config.data.batch_size=$((n * per_gpu)) --repeats 20 2>&1 | grep -v "$F" | tail -1
done
