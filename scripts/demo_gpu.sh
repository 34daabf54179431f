#!/usr/bin/env bash
# `uhap demo --config configs/demo.py:gpu` on one GPU machine, over as many calls as it takes: each call runs (or
# resumes) the demo in $WORK until BUDGET_S, stops it cleanly (SIGTERM: the training stage in flight checkpoints),
# and returns what it has so far to $OUT: the log, metrics and stage records, the benchmark's tables, the report.
# A warm machine keeps $WORK, so the next call resumes where this one stopped; a fresh one starts again.
#   bash scripts/demo_gpu.sh   (BUDGET_S default 550, WORK default /tmp/uhap_demo_gpu, DEMO_ARGS, VARIANT_ARGS,
#   VARIANT2_ARGS, CEILING_ARGS)
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-550}
WORK=${WORK:-/tmp/uhap_demo_gpu}
OUT=${OUT:-/tmp/uhap_demo_gpu_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD UHAP_CACHE=$WORK.cache
if [ -d .whl ] && ! python3 -c "import grain, ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v WARNING | tail -3
fi
[ -d /tmp/site ] && export PYTHONPATH=$PWD:/tmp/site
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU") | tee -a "$OUT/demo.log"
echo "resuming: $(ls "$WORK/stages" 2>/dev/null | tr '\n' ' ')" | tee -a "$OUT/demo.log"
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$'
timeout -s TERM -k 30 $((BUDGET_S - (SECONDS - START))) python3 -m uhap_jax.cli demo --config configs/demo.py:gpu \
  --workdir "$WORK" ${DEMO_ARGS:-} 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "$F" | grep --line-buffered -v "img/s\|it/s\]" \
  | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done >> "$OUT/demo.log"  # when each line came
echo "demo exit ${PIPESTATUS[0]} after $((SECONDS - START)) s; stages done: $(ls "$WORK/stages" 2>/dev/null | tr '\n' ' ')" \
  | tee -a "$OUT/demo.log"
# Then, once the demo is done, `uhap benchmark` again with another personalisation on the same models and data,
# into $WORK/benchmark_variant (VARIANT_ARGS) and $WORK/benchmark_variant2 (VARIANT2_ARGS): comparisons within one
# run. They are --config overrides on configs/personalize.py:base, not on the demo's personalisation: repeat the
# demo's own (its train.steps) there. Between them, with CEILING_ARGS, the representation's ceiling on the demo's
# data (`python -m data_pipelines.ceiling --data $WORK/data $CEILING_ARGS`) into $OUT/ceiling.json.
variant() {  # variant NAME ARGS
  local dir=$WORK/$1 left=$((BUDGET_S - (SECONDS - START) - 30))
  [ -n "$2" ] && [ -f "$WORK/stages/report.json" ] && [ ! -f "$dir/benchmark.json" ] && [ "$left" -gt 60 ] || return
  echo "$1: uhap benchmark --config configs/personalize.py:base $2" | tee -a "$OUT/demo.log"
  timeout -s TERM -k 20 "$left" python3 -m uhap_jax.cli benchmark --prior "$WORK/prior" --encoder "$WORK/encoder" \
    --audio-model "$WORK/audio" --data "$WORK/data" --out "$dir" \
    --config configs/personalize.py:base $2 2>&1 | grep -v "$F" | grep -v "img/s\|it/s\]" \
    | while IFS= read -r line; do printf '%s %s: %s\n' "$(date +%T)" "$1" "$line"; done >> "$OUT/demo.log"
  [ -f "$dir/benchmark.json" ] || echo "$1: not finished within BUDGET_S" | tee -a "$OUT/demo.log"
}
variant benchmark_variant "${VARIANT_ARGS:-}"
LEFT=$((BUDGET_S - (SECONDS - START) - 20))
if [ -n "${CEILING_ARGS:-}" ] && [ -f "$WORK/stages/data.json" ] && [ ! -f "$WORK/ceiling.json" ] && [ "$LEFT" -gt 60 ]; then
  echo "ceiling: python -m data_pipelines.ceiling --data $WORK/data $CEILING_ARGS" | tee -a "$OUT/demo.log"
  timeout -s TERM -k 20 "$LEFT" python3 -m data_pipelines.ceiling --data "$WORK/data" $CEILING_ARGS 2>&1 \
    | grep -v "$F" | tee "$WORK/ceiling.log" | tail -1 > "$WORK/ceiling.try"
  grep -q '^{' "$WORK/ceiling.try" && mv "$WORK/ceiling.try" "$WORK/ceiling.json"
  cp "$WORK/ceiling.log" "$OUT/" 2>/dev/null
  tail -2 "$WORK/ceiling.log" | cut -c1-2000 | tee -a "$OUT/demo.log"
fi
variant benchmark_variant2 "${VARIANT2_ARGS:-}"
(cd "$WORK" && tar czf "$OUT/results.tgz" --exclude='*.mp4' stages metrics.json report.html report benchmark/*.json \
  benchmark/*.csv benchmark_variant/*.json benchmark_variant/*.csv benchmark_variant2/*.json \
  benchmark_variant2/*.csv ceiling.json ceiling.log prior/metrics.jsonl audio/metrics.jsonl \
  encoder/metrics.jsonl personalize/metrics.jsonl 2>/dev/null)
cp "$WORK/talking_head.mp4" "$OUT/" 2>/dev/null
grep -i "error\|traceback\|finished in\|PASS\|FAIL" "$OUT/demo.log" | tail -40
exit 0
