#!/usr/bin/env bash
# The main job on the bundled demo model: build, generate, then SPEAR itself: quantize to 4 bits (RTN, per
# channel), diagnose, place and train error compensators under a 1% memory budget (`spear calibrate --preset
# fast`, a few minutes on 2 cores), and print the evaluation table (perplexity, gap closed, per-token KL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
MODEL=models/ref-llama-23m
DATA=../shared/data/test.txt
OUT=${SPEAR_DEMO_OUT:-out/demo}
WINDOWS=${SPEAR_DEMO_WINDOWS:-64}
mkdir -p "$OUT"
if [[ ! -f "$DATA" ]]; then
  echo "($DATA not found: measuring on the project's own docs instead)"
  cat README.md docs/*.md > "$OUT/demo_text.txt"
  DATA="$OUT/demo_text.txt"
fi
echo "== spear inspect"
build/spear inspect --model "$MODEL"
echo; echo "== spear generate (greedy)"
build/spear generate --model "$MODEL" --prompt "The meaning of" --max-tokens 32
echo; echo "== spear calibrate: W4 RTN per channel + error compensators at 1% of the model's bytes (fast preset)"
build/spear calibrate --model "$MODEL" --out "$OUT/w4-spear-fast" --method rtn --bits 4 --budget 0.01 --preset fast \
  --plot "$OUT/damage.png"
echo; echo "== spear eval (first $WINDOWS windows of 512 tokens of $(basename "$DATA"))"
build/spear eval --model "$MODEL" -p "$OUT/w4-spear-fast" --data "$DATA" --windows "$WINDOWS" --plot-kl "$OUT/kl.png"
echo; echo "plots: $OUT/damage.png (damage per module, compensated modules outlined), $OUT/kl.png (per-token KL)"
