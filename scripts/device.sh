#!/usr/bin/env bash
# The one entry for GPU-machine calls: `bash scripts/device.sh TASK [TASK ...]`, from the repo root there.
# It installs the carried Python 3.12 wheels (`.whl/*.whl`, fetched here by `bash scripts/fetch_wheels.sh`:
# grain, ml-collections, tensorflow-datasets and its imports, ...; GSPLAT=1 adds gsplat 1.5.3 for the rasterizer
# comparison) once, names the card, then runs each task; logs go to $OUT.
# Tasks make the tables of docs/benchmarks.md:
#   rasterizer     kernels.check on the GPU backends, then ours beside gsplat on every scene (BACKENDS, SCENES,
#                  REPEATS, CHECK_SEEDS, GSPLAT=0, PROFILE_SCENES)
#   train-bench    `uhap bench train` at the base preset (RASTER_BACKENDS, TRAIN_CONFIGS)
#   animate-fps    `uhap bench animate` at 512², base presets (FRAMES, BATCHES, BUDGET_S)
#   scaling        weak scaling of the train step over 1, 2, 4, ... GPUs (GPU_COUNTS, PER_GPU_FRAMES)
#   sweep-scaling  weak scaling of `uhap sweep`, one process per GPU (GPU_COUNTS, JOBS_PER_GPU, FRAMES, SIZE)
#   train-pipeline issue 19: synth (reduced base), `uhap bench train --real-data` (step alone, loader alone, end
#                  to end), a held-out-PSNR curve, the batch search (scripts/train_pipeline.sh: TASKS, BUDGET_S,
#                  SYNTH_ARGS, BENCH_ARGS, CURVE_ARGS, EVERY, SEARCH)
#   demo-gpu       issues 17, 18: `uhap demo --config configs/demo.py:gpu` (512², base models), resumed by the next
#                  call while the machine is warm (scripts/demo_gpu.sh: BUDGET_S, WORK, DEMO_ARGS, VARIANT_ARGS)
# On a CPU machine the tasks run too (slowly), which is how the script itself is checked.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-/tmp/uhap_device_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 \
    | grep -v WARNING | tail -3
  export PYTHONPATH=$PWD:/tmp/site TORCH_CUDA_ARCH_LIST=9.0
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sort | uniq -c
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
else
  GPUS=1
  echo "no nvidia-smi: CPU run"
fi

quiet() {  # drop XLA/absl chatter, keep our lines and tables
  grep -v '^  %\|^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
}

rasterizer() {
  local gs=""
  python3 -c "import gsplat" 2>/dev/null && [ "${GSPLAT:-1}" = 1 ] && gs="--gsplat"
  for b in ${BACKENDS:-cuda pallas}; do
    timeout 200 python3 -m kernels.check --seeds "${CHECK_SEEDS:-1}" --backend "$b" 2>&1 | grep "PASS\|FAIL\|Error" \
      | cut -c1-420
  done
  for b in ${BACKENDS:-cuda pallas}; do
    timeout "${BENCH_TIMEOUT:-400}" python3 -m kernels.bench --preset full --backend "$b" $gs --repeats "${REPEATS:-30}" \
      ${SCENES:+--scenes $SCENES} --out "$OUT/bench_$b.json" 2>&1 | quiet | grep "^|\|^device\|Error"
  done
  if [ -n "${PROFILE_SCENES:-}" ]; then
    timeout 100 python3 -m kernels.bench --preset full --profile --repeats 5 --backend "${BACKENDS%% *}" \
      --scenes $PROFILE_SCENES 2>&1 | quiet | head -30
  fi
}

train-bench() {
  for backend in ${RASTER_BACKENDS:-auto}; do
    for cfg in ${TRAIN_CONFIGS:-configs/prior.py:base}; do
      echo "== rasterizer backend $backend, $cfg"
      UHAP_RASTER_BACKEND=$backend timeout 300 python3 -m uhap_jax.cli bench train --config "$cfg" --repeats 10 2>&1 \
        | tee -a "$OUT/train_bench.log" | quiet | tail -5
    done
  done
}

animate-fps() {
  local common=(--prior-config configs/prior.py:base --audio-config configs/audio.py:base --size 512)
  echo "\$ uhap bench animate ${common[*]} --frames ${FRAMES:-256} --batch ${BATCHES:-1,8,32} --repeats 5"
  timeout 330 python3 -m uhap_jax.cli bench animate "${common[@]}" --frames "${FRAMES:-256}" \
    --batch "${BATCHES:-1,8,32}" --repeats 5 2>&1 | tee -a "$OUT/fps.log" | quiet | tail -8
}

scaling() {
  for n in ${GPU_COUNTS:-1 2 4 8}; do
    [ "$n" -le "$GPUS" ] || continue
    echo "== $n GPU(s)"
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout 200 python3 -m uhap_jax.cli bench train \
      --config configs/prior.py:base --config.data.batch_size=$((n * ${PER_GPU_FRAMES:-8})) --repeats 20 2>&1 \
      | quiet | tail -1
  done
}

sweep-scaling() {
  bash scripts/sweep_scaling.sh "$GPUS"
}

train-pipeline() {
  OUT=$OUT bash scripts/train_pipeline.sh
}

demo-gpu() {
  OUT=$OUT bash scripts/demo_gpu.sh
}

[ $# -gt 0 ] || { sed -n '2,17p' "$0"; exit 2; }
for task in "$@"; do
  declare -F "$task" >/dev/null || { echo "error: unknown task '$task' (see the list at the top of scripts/device.sh)"; exit 2; }
  echo "=== $task ($((SECONDS - START)) s into the call)"
  "$task"
done
echo "call took $((SECONDS - START)) s"
