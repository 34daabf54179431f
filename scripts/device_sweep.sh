#!/usr/bin/env bash
# Tuning sweep on the device: Pallas variants (forward kind, chunk, warps) on two scenes, with a stage breakdown,
# plus one gsplat run that saves both images for inspection. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=$PWD:/tmp/site TORCH_CUDA_ARCH_LIST=9.0
timeout 200 python3 -m kernels.bench --preset full --gsplat --repeats 10 --scenes head100k_512_x1 box1M_1080p \
  --save-images "$OUT" --out "$OUT/gsplat.json" 2>&1 | grep "^|"
for cfg in ${CONFIGS:-"seq 32 8" "seq 16 4" "block 16 8" "block 32 8" "seq 64 8"}; do
  set -- $cfg
  echo "== fwd=$1 chunk=$2 warps=$3"
  UHAP_PALLAS_FWD=$1 UHAP_PALLAS_CHUNK=$2 UHAP_PALLAS_WARPS=$3 timeout 150 python3 -m kernels.bench --preset full \
    --backend pallas --repeats 10 --scenes head100k_512_x16 box1M_1080p --out "$OUT/sweep_$1_$2_$3.json" 2>&1 | grep "^|"
done
