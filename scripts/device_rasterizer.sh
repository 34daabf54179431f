#!/usr/bin/env bash
# One device call: check Pallas against the reference on the GPU, then time both ours and gsplat 1.5.3.
# Run from the repo root on the device machine, with `.whl/gsplat-1.5.3-*.whl` carried (see docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 300 python3 -m kernels.check --seeds "${SEEDS:-1}" 2>&1 | grep -v "^W0000\|^I0000" | tail -20
if [ -d .whl ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
  export TORCH_CUDA_ARCH_LIST=9.0 GSPLAT=--gsplat
fi
timeout "${BENCH_TIMEOUT:-420}" python3 -m kernels.bench --preset full ${GSPLAT:-} --repeats "${REPEATS:-20}" \
  --out "$OUT/bench.json" ${SCENES:+--scenes $SCENES} 2>&1 | grep -v "^W0000\|^I0000" | tail -30
