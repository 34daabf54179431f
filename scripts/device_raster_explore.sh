#!/usr/bin/env bash
# One device call to decide what to change next: GPU correctness, binning stage times (per-camera vs flattened
# sorts), a per-op profile of forward+backward, and Pallas kernel variants (env knobs) on two head scenes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m kernels.check --seeds 1 2>&1 | grep "PASS\|FAIL" | cut -c1-420
timeout 200 python3 -m kernels.bench --preset full --stages --repeats 10 \
  --scenes ${STAGE_SCENES:-head100k_512_x16 head250k_1024_x4 box1M_1080p} 2>&1 | grep '^{' | tee "$OUT/stages.jsonl"
timeout 120 python3 -m kernels.bench --preset full --profile --repeats 5 \
  --scenes ${PROFILE_SCENES:-head100k_512_x16 box1M_1080p} 2>&1 | grep -v "$F" | tee "$OUT/profile.txt"
# VARIANTS="ENV=VALUE ...|scene scene;..." (knobs: UHAP_PALLAS_FWD_CHUNK, _CHUNK, _WARPS_FWD, _WARPS_BWD in
# kernels/pallas_composite.py, UHAP_FLAT_SORT in kernels/binning.py); each times pairs_ms, kernel_fwd_ms, kernel_bwd_ms.
IFS=";" read -ra cfgs <<< "${VARIANTS:-UHAP_PALLAS_WARPS_FWD=auto|head100k_512_x1 head100k_512_x16}"
for cfg in "${cfgs[@]}"; do
  echo "== ${cfg%%|*}"
  env ${cfg%%|*} timeout 150 python3 -m kernels.bench --preset full --backend pallas --repeats 10 \
    --scenes ${cfg##*|} 2>&1 | grep "^| head\|^| box\|rror"
done
