#!/usr/bin/env bash
# The benchmark table of docs/benchmarks.md: ours (Pallas) beside gsplat 1.5.3 on every scene, same card, same run.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
nvidia-smi --query-gpu=name --format=csv,noheader
# CONFIGS="chunk warps_fwd warps_bwd;..." sweeps Pallas settings first.
IFS=";" read -ra cfgs <<< "${CONFIGS:-}"
for cfg in "${cfgs[@]}"; do
  set -- $cfg
  echo "== chunk=$1 warps_fwd=$2 warps_bwd=$3"
  UHAP_PALLAS_CHUNK=$1 UHAP_PALLAS_WARPS_FWD=$2 UHAP_PALLAS_WARPS_BWD=$3 timeout 120 python3 -m kernels.bench \
    --preset full --backend pallas --repeats 10 --scenes ${SWEEP_SCENES:-head100k_512_x16} 2>&1 | grep "^| head\|^| box"
done
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=$PWD:/tmp/site TORCH_CUDA_ARCH_LIST=9.0
timeout 200 python3 -m kernels.check --seeds ${CHECK_SEEDS:-1} 2>&1 | grep "PASS\|FAIL" | cut -c1-420
timeout ${BENCH_TIMEOUT:-400} python3 -m kernels.bench --preset full --backend pallas --gsplat --repeats ${REPEATS:-30} \
  --out "$OUT/bench.json" 2>&1 | grep -v "$F" | grep "^|\|^device"
# PROFILE_SCENES="...": per-kernel device times of forward+backward after the table.
[ -n "${PROFILE_SCENES:-}" ] && timeout 100 python3 -m kernels.bench --preset full --profile --repeats 5 \
  --scenes $PROFILE_SCENES 2>&1 | grep -v "$F" | head -16
