#!/usr/bin/env bash
# Every SPEAR quality table of the README in one run on a many-core machine (the GPU host's CPUs):
#   tools/experiments/device_tables.sh SPEAR MODEL DATA_DIR OUT
# Phase 0 samples the calibration set once (256 sequences of 512 tokens from the model, seed 0) and makes the
# closed-form W4 package whose diagnosis the other W4 RTN runs reuse; phase 1 runs every configuration of
# JOBS_FILE in parallel (each killed at the deadline), phase 2 scores all packages on test.txt and valid.txt.
# Environment: BUDGET_S (whole run, default 560), EVAL_RESERVE (seconds kept for phase 2, default 200),
# JOBS_FILE, PHASE0_ARGS (extra phase-0 arguments, e.g. a smaller calibration set for a smoke test),
# PHASE0_FROM (a folder with calib.json and diag.json from an earlier phase 0: skips it).
set -u
SPEAR=$(realpath "$1"); MODEL=$2; DATA=$3; OUT=$4
JOBS_FILE=${JOBS_FILE:-$(dirname "$0")/device_jobs.txt}
if [[ -d "$OUT" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then echo "$OUT is not empty (stale packages would join the table)"; exit 2; fi
START=$(date +%s); DEADLINE=$((START + ${BUDGET_S:-560})); RESERVE=${EVAL_RESERVE:-200}
mkdir -p "$OUT/pkgs" "$OUT/logs"
export SPEAR_PROGRESS=0
t() { echo "[$(( $(date +%s) - START )) s] $*"; }
DIAG=$OUT/pkgs/w4-regression-cf/calibration_report.json
if [[ -n "${PHASE0_FROM:-}" ]]; then  # an earlier phase 0: its calib.json and diagnosis report
  cp "$PHASE0_FROM/calib.json" "$OUT/calib.json"; DIAG=$PHASE0_FROM/diag.json
else
t "phase 0: calibration ids and the W4 RTN diagnosis"
OMP_NUM_THREADS=$(nproc) "$SPEAR" calibrate --model "$MODEL" --out "$OUT/pkgs/w4-regression-cf" --steps 0 \
  --compensator static --save-calib-ids "$OUT/calib.json" ${PHASE0_ARGS:-} --json > "$OUT/logs/w4-regression-cf.json" 2> "$OUT/logs/w4-regression-cf.err" \
  || { t "phase 0 failed"; tail "$OUT/logs/w4-regression-cf.err"; }
fi
t "phase 1"
pids=()
while read -r name threads args; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  args=${args//@DIAG@/--diagnosis $DIAG}
  left=$(( DEADLINE - RESERVE - $(date +%s) ))
  ( t0=$(date +%s)
    OMP_NUM_THREADS=$threads timeout "$left" "$SPEAR" calibrate --model "$MODEL" --out "$OUT/pkgs/$name" \
      --calib-ids "$OUT/calib.json" --no-loss-eval $args --json > "$OUT/logs/$name.json" 2> "$OUT/logs/$name.err" \
      && t "done $name ($(( $(date +%s) - t0 )) s)" || t "FAILED $name: $(tail -c 300 "$OUT/logs/$name.err")" ) &
  pids+=($!)
done < "$JOBS_FILE"
wait "${pids[@]}"
pkgs=()
for d in "$OUT"/pkgs/*/; do [[ -f "$d/compensators.safetensors" ]] && pkgs+=("${d%/}"); done
n_split=2
for split in test valid; do
  left=$(( (DEADLINE + RESERVE / 4 - $(date +%s)) / n_split )); n_split=1
  t "phase 2: eval $split (${#pkgs[@]} packages, ${left} s left)"
  OMP_NUM_THREADS=$(nproc) timeout "$left" "$SPEAR" eval --model "$MODEL" --data "$DATA/$split.txt" -p "${pkgs[@]}" \
    --json > "$OUT/eval-$split.json" 2> "$OUT/logs/eval-$split.err" || t "eval $split incomplete"
done
rm -f "$OUT"/pkgs/*/model.safetensors "$OUT"/pkgs/*/tokenizer.json
t "end"
