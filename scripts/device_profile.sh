#!/usr/bin/env bash
# Device call: correctness (GPU vs GPU reference vs CPU), binning stage times, ncu on both kernels, a config sweep.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m kernels.check --seeds 1 2>&1 | grep -v "$F" | tail -4
timeout 150 python3 -m kernels.bench --preset full --stages --repeats 10 --scenes head100k_512_x16 box1M_1080p 2>&1 | grep '^{'
if command -v ncu >/dev/null; then
  for k in fwd bwd; do
    timeout 120 ncu --kernel-name "regex:gaussian_composite_$k" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section ComputeWorkloadAnalysis \
      python3 -m kernels.bench --preset full --backend pallas --repeats 1 --scenes head100k_512_x16 > "$OUT/ncu_$k.txt" 2>&1
    grep -E "Duration|Registers Per|Local|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Spill|Theoretical Occ|Block Limit Reg|Shared Memory Config|Dynamic Shared" "$OUT/ncu_$k.txt" | head -14
  done
fi
for cfg in ${CONFIGS:-"16 4 8" "8 4 8" "16 8 16" "8 4 4"}; do
  set -- $cfg
  echo "== chunk=$1 warps_fwd=$2 warps_bwd=$3"
  UHAP_PALLAS_CHUNK=$1 UHAP_PALLAS_WARPS_FWD=$2 UHAP_PALLAS_WARPS_BWD=$3 timeout 120 python3 -m kernels.bench \
    --preset full --backend pallas --repeats 10 --scenes head100k_512_x1 head100k_512_x16 2>&1 | grep "^| head"
done
