#!/usr/bin/env bash
# Weak scaling of an evaluation sweep (`uhap sweep`) on one host: 1, 2, 4, ... GPUs, one JAX process per GPU
# (jax.distributed through --coordinator_address/--num_processes/--process_id; CUDA_VISIBLE_DEVICES gives each
# process its own GPU; the 1-GPU run is a plain single-process sweep). Each GPU count gets JOBS_PER_GPU jobs per
# process: the sweep splits jobs round-robin, so every process evaluates the same number.
#
# Setup (not timed): a small synthetic dataset in the template topology of PRIOR (3 identities, 6 cameras of which
# 2 are held out, 10 frames a sequence, SIZE² images), its records, and an untrained inference bundle of PRIOR
# written in `uhap export`'s format (step 0). Each job then scores FRAMES frames (two held-out views each) at
# SIZE², as a sweep job does: subject tables and eval set on the host, encode -> decode -> render -> PSNR/SSIM, and
# the neutral-scan Chamfer. The jobs are identical (image_scale 1.0 repeated), so only the first one of each process
# compiles; no persistent compilation cache, so every process pays its own compile, as a real sweep does.
#
# Reports per GPU count: wall seconds of the whole `uhap sweep` (start-up, loading, compile, jobs, merge), the job
# phase (the slowest process's summed job seconds from results.csv), jobs/s and images/s, and the efficiency
# (throughput / (GPUs x 1-GPU throughput)). On a CPU machine it runs too (JAX_PLATFORMS=cpu, small PRIOR/SIZE) as a
# smoke test of the script.
# Called by `bash scripts/device.sh sweep-scaling` (which installs the wheels); the argument is the GPU count.
set -uo pipefail
START=$SECONDS
total=${1:-1}
WORK=${WORK:-/tmp/uhap_sweep_scaling}
PRIOR=${PRIOR:-configs/prior.py:base}
SIZE=${SIZE:-512}
FRAMES=${FRAMES:-32}
BATCH=${BATCH:-8}
JOBS_PER_GPU=${JOBS_PER_GPU:-4}
export UHAP_CACHE=$WORK/cache
LOG=${OUT:-$WORK}/sweep_scaling.log
mkdir -p "$WORK"
: >"$LOG"

python3 - "$WORK" "$PRIOR" "$SIZE" <<'EOF' 2>&1 | tee -a "$LOG" | grep -v '^W0000\|^I0000\|^E0000\|^ *$'
import pathlib, sys, time
import ml_collections
from flax import nnx
from data_pipelines import dataset, synth
from uhap_jax.artifacts import bundles
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import build_prior

work, prior_spec, size = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = load_config(prior_spec)
start = time.perf_counter()
data_root = work / "data"
if not (data_root / "dataset.json").is_file():
    cfg = synth.synth_config("tiny")
    cfg.update(dict(image_size=size, template_resolution=config.model.template_resolution, num_identities=3,
                    num_held_out_identities=1, sentences_per_identity=2, num_held_out_sentences=1,
                    max_seconds=0.4, num_cameras=6, held_out_cameras=(1, 4), monocular=False))
    synth.generate(data_root, cfg, progress=False)
data = ml_collections.ConfigDict({"data": {"root": str(data_root), "synth_preset": "tiny", "cache_dir": ""}})
records = dataset.prepared_records(dataset.dataset_root(data), data)
print(f"setup: dataset {data_root} ({len(records.source)} records at {size}²) in {time.perf_counter() - start:.1f} s")
bundle = work / "bundle"
if not (bundle / bundles.BUNDLE_FILE).is_file():  # what `uhap export` writes, from a freshly initialised prior
    template = template_lib.procedural_head(config.model.template_resolution)
    params = nnx.to_pure_dict(nnx.state(build_prior(template, config), nnx.Param))
    manifest = {"kind": "uhap_prior", "step": 0, "dtype": "float32", "source": f"untrained {prior_spec}"}
    bundles.save_bundle(params, config, template, bundle, manifest)
print(f"setup: untrained {prior_spec} bundle in {bundle}; setup done in {time.perf_counter() - start:.1f} s")
EOF
[ -f "$WORK/bundle/bundle.json" ] || { echo "setup failed; see $LOG"; exit 1; }
echo "setup took $((SECONDS - START)) s"

: >"$WORK/rows.tsv"
port=$((20000 + RANDOM % 20000))
for n in ${GPU_COUNTS:-1 2 4 8}; do
  [ "$n" -le "$total" ] || continue
  jobs=$((n * JOBS_PER_GPU))
  scales="($(for _ in $(seq $jobs); do printf '1.0,'; done))"
  rm -rf "$WORK/sweep$n"
  t0=$(date +%s.%N)
  pids=()
  for ((i = 0; i < n; i++)); do
    dist=()
    ((n > 1)) && dist=(--coordinator_address=127.0.0.1:$((port + n)) --num_processes=$n --process_id=$i)
    CUDA_VISIBLE_DEVICES=$i timeout ${SWEEP_TIMEOUT:-200} python3 -m uhap_jax.cli sweep \
      --config configs/sweep.py:base --workdir "$WORK/sweep$n" \
      --config.checkpoints="(\"$WORK/bundle\",)" --config.datasets="(\"$WORK/data\",)" \
      --config.settings.image_scale="$scales" --config.settings.num_views="(0,)" \
      --config.eval.num_frames=$FRAMES --config.eval.batch_size=$BATCH "${dist[@]}" >"$WORK/log$n.$i" 2>&1 &
    pids+=($!)
  done
  rc=0
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  t1=$(date +%s.%N)
  cat "$WORK"/log$n.* >>"$LOG"
  if ((rc != 0)) || [ ! -f "$WORK/sweep$n/results.csv" ]; then
    echo "== $n GPU(s): failed (rc $rc)"; grep -v '^W0000\|^I0000' "$WORK/log$n.0" | tail -15
    continue
  fi
  printf '%s\t%s\t%s\n' "$n" "$jobs" "$(awk "BEGIN {print $t1 - $t0}")" >>"$WORK/rows.tsv"
  echo "== $n GPU(s): $jobs jobs, done at $((SECONDS - START)) s"
done

python3 - "$WORK" "$FRAMES" <<'EOF'
import csv, statistics, sys
from collections import defaultdict
work, frames = sys.argv[1], int(sys.argv[2])
rows = [line.split("\t") for line in open(f"{work}/rows.tsv").read().splitlines() if line]
print("| GPUs | jobs | wall_s | jobs/s (wall) | job phase s | first job s | later job s | jobs/s (jobs) "
      "| images/s (jobs) | efficiency (wall) | efficiency (jobs) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
base = None
for n, jobs, wall in rows:
    n, jobs, wall = int(n), int(jobs), float(wall)
    results = list(csv.DictReader(open(f"{work}/sweep{n}/results.csv")))
    per_process = defaultdict(list)
    for row in sorted(results, key=lambda r: int(r["job"])):
        per_process[int(row["process"])].append(float(row["seconds"]))
    phase = max(sum(s) for s in per_process.values())
    first = statistics.mean(s[0] for s in per_process.values())
    later = statistics.median([x for s in per_process.values() for x in s[1:]] or [float("nan")])
    rate_wall, rate_jobs = jobs / wall, jobs / phase
    base = base or (n, rate_wall, rate_jobs)
    eff_wall = rate_wall / (n / base[0] * base[1])
    eff_jobs = rate_jobs / (n / base[0] * base[2])
    print(f"| {n} | {jobs} | {wall:.1f} | {rate_wall:.3f} | {phase:.1f} | {first:.1f} | {later:.2f} | "
          f"{rate_jobs:.3f} | {rate_jobs * frames * 2:.0f} | {eff_wall:.0%} | {eff_jobs:.0%} |")
print(f"(images = {frames} frames x 2 held-out views per job; psnr of job 0 at {n} GPUs: {results[0]['psnr']})")
EOF
echo "call took $((SECONDS - START)) s"
