#!/usr/bin/env bash
# What issues #9 and #12 still need an accelerator for (BUILD_NOTES, "GPU recipe"):
#
#   bash experiments/gpu_runs.sh PART [PART ...]                 the parts in this order, in one call
#   bash experiments/gpu_runs.sh lake|koch [--config.x=y ...]     one part, overrides for its trainings
#   bash experiments/gpu_runs.sh bench [--only=ROW,...]           one part, flags for the benchmark
#
#   lake   omniglot_gpu (4 x conv-128 + BN at 56 px, batch-hard, P x K 128 x 4, 6,000 steps), seeds 0, 1
#          and 2 one after the other, each timed from its command's start to its exit, final
#          evaluation included. Issue #9 item 6: Lake's 20 runs >= 98% within 60 s; issue #12 items 1
#          and 4: >= 98.5%, >= 99.0% on the 3-seed mean. Seed 0 is the machine's first run (cold
#          data cache: the archives are decoded), seeds 1 and 2 find the cache warm.
#   bench  python -m experiments.benchmark: bf16 steps against torch.compile bf16 + channels_last.
#   koch   omniglot_koch (Koch et al.'s network and verification loss, affine distortions), seed 0.
#          Issue #12 item 4: >= 92.0% on Lake's 20 runs.
#
# The device tool brings back at most 8 files from $OUT, so each run leaves ONE file there as soon as
# it ends, $OUT/<run>.tar.gz (its log, results.json, metrics.jsonl, config.json and wall time, or the
# benchmark's log and JSON), and its line in $OUT/summary.txt, also printed (the reply's output tail
# has it): the three parts together leave 6 files. A run that fails is marked FAILED there, its
# archive is <run>.FAILED.tar.gz (so a failed rerun never replaces an earlier good archive in a kept
# $OUT), and the next one runs; a call cut off by its time limit keeps every run that had ended. Workdirs
# (checkpoints) go to $WORK (default /tmp/gpu_runs), each removed before its run so that a warm
# machine does not resume an old one. Where python lacks ml_collections or tensorboardX (the device
# image does), the wheels in .whl/ are installed to /tmp/site first; the data come from
# $SIAMESE_DATA_DIR (default: .data/ in the checkout). Exit 0 when every run of this call succeeded.
# A dry run on a CPU, ~30 s per run with a CPU-sized encoder (the real one takes minutes per run):
#   GPU_RUNS_STEPS=20 bash experiments/gpu_runs.sh lake "--config.widths=(16,16,16,16)" \
#     --config.classes_per_batch=8 --config.test_time_shifts=none
set -uo pipefail
usage="usage: $0 PART [PART ...] | lake|koch [--config.x=y ...] | bench [--only=ROW,...]   (PART: lake, bench, koch)"
parts=()
while [ $# -gt 0 ]; do
  case "$1" in lake|bench|koch) parts+=("$1"); shift ;; *) break ;; esac
done
if [ ${#parts[@]} -eq 0 ] || { [ ${#parts[@]} -gt 1 ] && [ $# -gt 0 ]; }; then
  echo "$usage" >&2
  exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/gpu_runs}
mkdir -p "$OUT" "$WORK" || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SIAMESE_DATA_DIR="${SIAMESE_DATA_DIR:-$PWD/.data}"
summary="$OUT/summary.txt"
"$PY" -c "import jax; print('devices:', jax.__version__, jax.devices())" | tee -a "$summary" || exit 1

# GPU_RUNS_STEPS: a dry run's step count (validation, checkpoints and the final evaluation shrunk with it);
# GPU_RUNS_TRAIN_ARGS: overrides for every training of the call, on one line, split at spaces (no
# quoting: a value may not hold a space); a dry run's small sizes.
dry=()
if [ -n "${GPU_RUNS_STEPS:-}" ]; then
  dry=(--config.num_steps="$GPU_RUNS_STEPS" --config.eval_every_steps="$GPU_RUNS_STEPS"
       --config.checkpoint_every_steps="$GPU_RUNS_STEPS" --config.eval_episodes=20 --config.val_episodes=20
       --config.plots=False)
fi
read -r -a train_args <<< "${GPU_RUNS_TRAIN_ARGS:-}"
dry+=(${train_args[@]+"${train_args[@]}"})

failed=0
fail() {  # summary line
  echo "$1" | tee -a "$summary"
  failed=1
}

# One archive per run, written aside and moved in: a call cut off mid-write leaves no torn archive.
archive() {  # name dir files...
  local name=$1 dir=$2
  shift 2
  tar -czf "$OUT/.$name.tar.gz.tmp" -C "$dir" "$@" && mv -T "$OUT/.$name.tar.gz.tmp" "$OUT/$name.tar.gz" \
    || { rm -f "$OUT/.$name.tar.gz.tmp"; return 1; }
}

seconds_since() { "$PY" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$1"; }

# One line for a training: Lake's 20 runs, the 20-way 1-shot protocols, the checkpoint, the times.
summarise_training() {  # name workdir wall_seconds
  "$PY" - "$@" <<'PYEOF'
import json, pathlib, sys
name, run, wall = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
r = json.loads((run / "results.json").read_text())
ep = r.get("episodes", {})
get = lambda k: ep.get(k, {}).get("mean", float("nan"))
print(f"{name}: Lake {r['lake_20_runs']['accuracy']:.2%}  unstructured 20w1s {get('unstructured/20-way-1-shot'):.3f}"
      f"  within 20w1s {get('within_alphabet/20-way-1-shot'):.3f}  step {r['checkpoint_step']}  train {r['train_seconds']} s"
      f"  eval {r['eval_seconds']} s  wall {wall} s  ({r['platform']}, {r['devices']} device(s))")
PYEOF
}

# One line per benchmark row: ours, the peer, the ratio.
summarise_benchmark() {  # benchmark.json
  "$PY" - "$1" <<'PYEOF'
import json, sys
nan = float("nan")
for row in json.load(open(sys.argv[1]))["rows"]:
    print(f"bench {row['id']}: ours {row['ours'] or nan:.2f} {row['unit']}  {row['peer_name']} {row['peer'] or nan:.2f}"
          f"  ratio {row['ratio'] or nan:.2f}x")
PYEOF
}

train_timed() {  # name config seed [overrides...]
  local name=$1 config=$2 seed=$3 start wall rc
  shift 3
  rm -rf "${WORK:?}/$name" "$WORK/$name.log"
  start=$(date +%s.%N)
  "$PY" -m experiments.train --config="$config" --workdir="$WORK/$name" --config.seed="$seed" ${dry[@]+"${dry[@]}"} "$@" \
    2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  wall=$(seconds_since "$start")
  mkdir -p "$WORK/$name" && cp "$WORK/$name.log" "$WORK/$name/train.log" && echo "$wall" > "$WORK/$name/wall_seconds.txt"
  local files=(train.log wall_seconds.txt) f ok=0 arc="$name.FAILED"
  for f in results.json metrics.jsonl config.json; do [ -f "$WORK/$name/$f" ] && files+=("$f"); done
  if [ "$rc" -eq 0 ] && [ -f "$WORK/$name/results.json" ]; then ok=1 arc=$name; fi
  if ! archive "$arc" "$WORK/$name" "${files[@]}"; then
    fail "$name: FAILED (exit $rc after $wall s; its archive could not be written to $OUT)"
  elif [ "$ok" -eq 1 ]; then
    rm -f "$OUT/$name.FAILED.tar.gz"  # an earlier call's failure of the same run, now superseded
    summarise_training "$name" "$WORK/$name" "$wall" | tee -a "$summary"
  else
    fail "$name: FAILED (exit $rc after $wall s; its log is in $arc.tar.gz)"
  fi
}

benchmark() {  # [benchmark flags...]
  local dir="$WORK/bench" start wall rc quick=()
  rm -rf "$dir" && mkdir -p "$dir"
  [ -n "${GPU_RUNS_STEPS:-}" ] && quick=(--quick)
  start=$(date +%s.%N)
  "$PY" -m experiments.benchmark ${quick[@]+"${quick[@]}"} --out="$dir/benchmark.json" "$@" 2>&1 | tee "$dir/benchmark.log"
  rc=${PIPESTATUS[0]}
  wall=$(seconds_since "$start")
  local files=(benchmark.log) f ok=0 arc=bench.FAILED
  # (benchmark.incomplete.json: the rows measured before a failure)
  for f in benchmark.json benchmark.incomplete.json; do [ -f "$dir/$f" ] && files+=("$f"); done
  if [ "$rc" -eq 0 ] && [ -f "$dir/benchmark.json" ]; then ok=1 arc=bench; fi
  if ! archive "$arc" "$dir" "${files[@]}"; then
    fail "bench: FAILED (exit $rc after $wall s; its archive could not be written to $OUT)"
  elif [ "$ok" -eq 1 ]; then
    rm -f "$OUT/bench.FAILED.tar.gz"
    summarise_benchmark "$dir/benchmark.json" | tee -a "$summary"
    echo "bench: wall $wall s" | tee -a "$summary"
  else
    fail "bench: FAILED (exit $rc after $wall s; its log is in $arc.tar.gz)"
  fi
}

for part in "${parts[@]}"; do
  case "$part" in
    lake) for seed in 0 1 2; do train_timed "omniglot-gpu-s$seed" experiments/configs/omniglot_gpu.py "$seed" "$@"; done ;;
    koch) train_timed koch-s0 experiments/configs/omniglot_koch.py 0 "$@" ;;
    bench) benchmark "$@" ;;
  esac
done
exit "$failed"
