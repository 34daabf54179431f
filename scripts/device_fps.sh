#!/usr/bin/env bash
# Device call: `uhap bench animate` (speech model -> codes -> decode -> render -> host) at 512², base presets, one GPU.
# Needs `.whl/extra/*.whl` (ml-collections, grain, imageio-ffmpeg, ... for Python 3.12) carried. Prints the card and the tables;
# the full log goes to $OUT/fps.log. Variants after the main table run only while the call is young (BUDGET_S).
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-200}
pip install -q --no-index --no-deps --target /tmp/site .whl/extra/*.whl 2>&1 | grep -v WARNING | tail -3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/fps.log
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
F='^  %\|^W0000\|^I0000\|^E0000\|slow_operation\|Constant folding\|This isn.t\|XLA has some\|If you.d like\|^ *$\|pad\.'
bench() {  # prints the command and its table
  echo; echo "\$ uhap bench animate $*"
  timeout 330 python3 -m uhap_jax.cli bench animate "$@" 2>&1 | tee -a "$LOG" | grep -v "$F" | tail -8
}
COMMON=(--prior-config configs/prior.py:base --audio-config configs/audio.py:base --size 512)
bench "${COMMON[@]}" --frames ${FRAMES:-256} --batch ${BATCHES:-1,8,32} --repeats 5
# What `uhap animate` reads today (float32 frames), and the train stage's capacity bound (any trained model).
for variant in "--host-dtype float32" "--capacity widest"; do
  if (( SECONDS - START < BUDGET_S )); then
    bench "${COMMON[@]}" --frames 96 --batch ${VARIANT_BATCH:-32} --repeats 3 $variant
  else
    echo; echo "skipped ($variant): $((SECONDS - START)) s spent, budget $BUDGET_S s"
  fi
done
echo; echo "call took $((SECONDS - START)) s"
