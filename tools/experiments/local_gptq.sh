#!/usr/bin/env bash
# The GPTQ W4 rows of issue 4's tables, run on a small machine (GPTQ's quantization scales poorly with threads, so
# it does not fit the parallel device run): closed-form baselines on the calibration set of the device tables,
# then every GPTQ package scored on test.txt and valid.txt.
#   tools/experiments/local_gptq.sh SPEAR MODEL DATA_DIR OUT [EXISTING_SPEAR_PACKAGE]
set -eu
SPEAR=$(realpath "$1"); MODEL=$2; DATA=$3; OUT=$4; SPEAR_PKG=${5:-}
PHASE0=$(dirname "$0")/../../bench/results/spear-490bce6-h200x4-cpu/phase0
mkdir -p "$OUT/pkgs" "$OUT/logs"
export SPEAR_PROGRESS=0
if [[ -n "$SPEAR_PKG" ]]; then cp -r "$SPEAR_PKG" "$OUT/pkgs/w4gptq-spear"; else
  "$SPEAR" calibrate --model "$MODEL" --out "$OUT/pkgs/w4gptq-spear" --method gptq --calib-ids "$PHASE0/calib.json" \
    --no-loss-eval --json > "$OUT/logs/w4gptq-spear.json" 2> "$OUT/logs/w4gptq-spear.err"; fi
DIAG=$OUT/pkgs/w4gptq-spear/calibration_report.json
for init in qera lqer svd; do
  echo "[$(date +%T)] w4gptq-$init-cf"
  "$SPEAR" calibrate --model "$MODEL" --out "$OUT/pkgs/w4gptq-$init-cf" --method gptq --calib-ids "$PHASE0/calib.json" \
    --diagnosis "$DIAG" --steps 0 --compensator static --init $init --no-loss-eval --json \
    > "$OUT/logs/w4gptq-$init-cf.json" 2> "$OUT/logs/w4gptq-$init-cf.err"
done
for split in test valid; do
  echo "[$(date +%T)] eval $split"
  "$SPEAR" eval --model "$MODEL" --data "$DATA/$split.txt" -p "$OUT"/pkgs/* --json > "$OUT/eval-$split.json" \
    2> "$OUT/logs/eval-$split.err"
done
echo "[$(date +%T)] end"
