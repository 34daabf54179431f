#!/usr/bin/env bash
# The benchmark table of docs/benchmarks.md: our kernel backends beside gsplat 1.5.3 on every scene, same card, same
# run. BACKENDS="cuda pallas" (default) picks which; GSPLAT=0 skips gsplat; SCENES limits the scenes.
set -uo pipefail
BACKENDS=${BACKENDS:-cuda pallas}
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
nvidia-smi --query-gpu=name --format=csv,noheader
GS=""
if [ "${GSPLAT:-1}" = 1 ] && pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; then
  export PYTHONPATH=$PWD:/tmp/site TORCH_CUDA_ARCH_LIST=9.0
  GS="--gsplat"
fi
/usr/bin/time -f "cuda build: %e s" python3 -c "from kernels import cuda_ops as c; print(c.build())" 2>&1 | tail -2
for b in $BACKENDS; do
  timeout 200 python3 -m kernels.check --seeds ${CHECK_SEEDS:-1} --backend "$b" 2>&1 | grep "PASS\|FAIL\|Error" | cut -c1-420
done
for b in $BACKENDS; do
  timeout ${BENCH_TIMEOUT:-400} python3 -m kernels.bench --preset full --backend "$b" $GS --repeats ${REPEATS:-30} \
    ${SCENES:+--scenes $SCENES} --out "$OUT/bench_$b.json" 2>&1 | grep -v "$F" | grep "^|\|^device\|Error"
done
# PROFILE_SCENES="...": per-kernel device times of forward+backward after the table (first backend).
if [ -n "${PROFILE_SCENES:-}" ]; then
  timeout 100 python3 -m kernels.bench --preset full --profile --repeats 5 --backend "${BACKENDS%% *}" \
    --scenes $PROFILE_SCENES 2>&1 | grep -v "$F" | head -30
fi
