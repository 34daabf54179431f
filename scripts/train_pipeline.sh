#!/usr/bin/env bash
# Issue 19 on one GPU machine, in one call (`bash scripts/device.sh train-pipeline`, or alone): synthesise the reduced base dataset (timed), `uhap bench train
# --real-data` (step alone, loader alone, end to end, peak memory), a base-preset training run with held-out-camera
# evals every EVERY steps until the call's time is spent (the curve), then the batch-size search with what is left.
# Everything goes to $OUT as it happens (synth.log, bench.log, train.log, metrics.jsonl, search.log), so a call
# cut short still returns what it did. A warm machine keeps /tmp: the dataset and its caches are made once.
#   TASKS="synth bench curve search" (default all), BUDGET_S (default 570: the call's limit less a margin),
#   CONFIG, CURVE_ARGS (extra --config.* overrides of the curve run), RUN (its name), CURVE_ARGS_B (a second curve
#   beside it, for an A/B of settings), SEARCH ("8,16,32,..."), CURVE_S (the curve's seconds, at most what is left).
# On a CPU machine, for a smoke test: CONFIG=configs/prior.py:tiny SYNTH_ARGS=... NO_WHEELS=1.
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
TASKS=${TASKS:-synth bench curve search}
OUT=${OUT:-/tmp/out19}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ] && ! python3 -c "import grain, tensorflow_datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v WARNING | tail -3
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # device.sh installed them already, or a CPU machine
fi
WORK=${WORK:-/tmp/uhap19}
export UHAP_CACHE=$WORK/cache
DATA=$WORK/synth
CONFIG=${CONFIG:-configs/prior.py:base}
SYNTH_ARGS=${SYNTH_ARGS:---preset base --config.num_identities=6 --config.sentences_per_identity=3 --config.max_seconds=2.0}
RUN=${RUN:-fixed}
F='^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|examples/s\]'
left() { echo $((BUDGET_S - (SECONDS - START))); }
(nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader 2>/dev/null || echo "no GPU") | tee "$OUT/device.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/device.txt"

if [[ " $TASKS " == *" synth "* ]] && [ ! -f "$DATA/dataset.json" ]; then
  t=$SECONDS
  python3 -m uhap_jax.cli data synth --out "$DATA" $SYNTH_ARGS 2>&1 | tr '\r' '\n' | grep -v "$F" | tail -4 \
    | tee "$OUT/synth.log"
  echo "synth: $((SECONDS - t)) s ($(find "$DATA" -name '*.png' | wc -l) PNGs): uhap data synth $SYNTH_ARGS" \
    | tee -a "$OUT/synth.log"
fi

if [[ " $TASKS " == *" bench "* ]]; then
  echo "== uhap bench train --config $CONFIG --real-data DATA (t=$((SECONDS - START)) s)"
  SPY=()  # PROFILE=1: py-spy samples every thread of the bench (where the host's time goes), summarised below
  [ -n "${PROFILE:-}" ] && SPY=(/tmp/site/bin/py-spy record --threads --idle --nonblocking -r 50 -f raw -o "$OUT/spy.txt" --)
  timeout -k 10 $(( $(left) < ${BENCH_S:-240} ? $(left) : ${BENCH_S:-240} )) "${SPY[@]}" python3 -m uhap_jax.cli bench train \
    --config "$CONFIG" --real-data "$DATA" --steps "${STEPS:-100}" ${BENCH_ARGS:-} 2>&1 | grep -v "$F" \
    | tee -a "$OUT/bench.log" | grep -v "Generating\|Dataset capture\|Downloading\|\[A\|py-spy" | tail -12
  [ -n "${PROFILE:-}" ] && python3 scripts/spy_summary.py "$OUT/spy.txt" | head -60
fi

# One curve: `uhap train prior` until the budget is spent, evals every EVERY steps; its log and metrics go to $OUT.
curve() {  # name, seconds, extra --config.* overrides
  rm -rf "$WORK/run_$1"
  timeout -k 30 "$2" python3 -m uhap_jax.cli train prior --config "$CONFIG" --workdir "$WORK/run_$1" \
    --config.data.root="$DATA" --config.eval.every="${EVERY:-200}" $3 2>&1 | tr '\r' '\n' | grep -v "$F" \
    > "$OUT/train_$1.log"
  cp "$WORK/run_$1/metrics.jsonl" "$OUT/metrics_$1.jsonl" 2>/dev/null
  # The held-out renders (render | truth | error) of the best and the last evaluation.
  python3 - "$WORK/run_$1" "$OUT" "$1" <<'PY' || true
import json, shutil, sys
from pathlib import Path
run, out, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/psnr" in line]
for tag, row in (("best", max(evals, key=lambda r: r["eval/psnr"])), ("last", evals[-1])):
    image = run / "images" / f"heldout_render_gt_error_{row['step']:08d}.png"
    if image.exists():
        shutil.copy(image, out / f"heldout_{name}_{tag}_step{row['step']}.png")
PY
}

if [[ " $TASKS " == *" curve "* ]]; then
  SPARE=${SEARCH_S:-0}
  [[ " $TASKS " == *" search "* ]] || SPARE=0
  SECS=$(( $(left) - SPARE - 20 ))
  [ -n "${CURVE_S:-}" ] && [ "$CURVE_S" -lt "$SECS" ] && SECS=$CURVE_S  # a shorter curve (several in one call)
  # CURVE_ARGS_B: a second run beside the first on the same GPU (an A/B of settings; each gets about half the GPU).
  if [ -n "${CURVE_ARGS_B:-}" ]; then
    echo "== curve ${RUN}_b: ${CURVE_ARGS_B} (t=$((SECONDS - START)) s)"
    UHAP_CACHE=$WORK/cache_b curve "${RUN}_b" "$SECS" "$CURVE_ARGS_B" &
  fi
  echo "== curve $RUN: uhap train prior --config $CONFIG --config.eval.every=${EVERY:-200} ${CURVE_ARGS:-} (t=$((SECONDS - START)) s)"
  curve "$RUN" "$SECS" "${CURVE_ARGS:-}"
  wait
  for name in "$RUN" ${CURVE_ARGS_B:+${RUN}_b}; do
    echo "-- $name"
    grep "eval at step" "$OUT/train_$name.log" | sed 's/.*eval at step/eval at step/' | tail -40
    grep -i "error\|Traceback" "$OUT/train_$name.log" | head -5
  done
fi

if [[ " $TASKS " == *" search "* ]] && [ "$(left)" -gt 60 ]; then
  echo "== batch search ${SEARCH:-8,16,32,64} (t=$((SECONDS - START)) s)"
  timeout -k 10 $(( $(left) - 5 )) python3 -m uhap_jax.cli bench train --config "$CONFIG" \
    --batch-search "${SEARCH:-8,16,32,64}" --repeats 3 2>&1 | grep -v "$F" | tee "$OUT/search.log" | tail -12
fi
echo "done in $((SECONDS - START)) s"
