#!/usr/bin/env bash
# Device call: the CUDA backend built with and without FMA contraction (UHAP_CUDA_FLAGS), each checked against the
# reference (3 seeds) and timed on two head scenes, then a per-kernel profile of the 16-view forward+backward.
set -uo pipefail
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
for fl in "" "-fmad=false"; do
  echo "== flags: $fl"
  UHAP_CUDA_FLAGS="$fl" timeout 200 python3 -m kernels.check --seeds 3 --backend cuda 2>&1 | grep "PASS\|FAIL\|Error" | cut -c1-330
  UHAP_CUDA_FLAGS="$fl" timeout 100 python3 -m kernels.bench --preset full --backend cuda --repeats 10 --scenes head100k_512_x1 head100k_512_x16 2>&1 | grep "^| head"
done
timeout 100 python3 -m kernels.bench --preset full --profile --repeats 5 --backend cuda --scenes head100k_512_x16 2>&1 | grep -v "$F" | head -45
