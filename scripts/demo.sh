#!/usr/bin/env bash
# The main job on the bundled demo model: build, inspect, generate, quantize to 4 bits, and compare
# perplexity of the full-precision model and the W4 packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
MODEL=models/ref-llama-23m
DATA=../shared/data/test.txt
OUT=${SPEAR_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
if [[ ! -f "$DATA" ]]; then
  echo "($DATA not found: measuring on the project's own docs instead)"
  cat README.md docs/*.md > "$OUT/demo_text.txt"
  DATA="$OUT/demo_text.txt"
fi
echo "== spear inspect"
build/spear inspect --model "$MODEL"
echo; echo "== spear generate (greedy)"
build/spear generate --model "$MODEL" --prompt "The meaning of" --max-tokens 48
echo; echo "== spear quantize: RTN and GPTQ, 4 bits per channel"
build/spear quantize --model "$MODEL" --out "$OUT/w4-rtn" --method rtn --bits 4
build/spear quantize --model "$MODEL" --out "$OUT/w4-gptq" --method gptq --bits 4 --calib-samples 32
echo; echo "== spear ppl (first 64 windows of 512 tokens)"
printf "%-16s %s\n" model perplexity
for m in "$MODEL" "$OUT/w4-rtn" "$OUT/w4-gptq"; do
  ppl=$(build/spear ppl --model "$m" --data "$DATA" --max-windows 64 --json | python3 -c "import json,sys; print('%.3f' % json.load(sys.stdin)['ppl'])")
  printf "%-16s %s\n" "$(basename "$m")" "$ppl"
done
