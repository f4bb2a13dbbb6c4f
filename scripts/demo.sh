#!/usr/bin/env bash
# The main job on the bundled demo model: build, inspect, generate, and measure perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
MODEL=models/ref-llama-23m
DATA=../shared/data/test.txt
echo "== spear inspect"
build/spear inspect --model "$MODEL"
echo; echo "== spear generate (greedy)"
build/spear generate --model "$MODEL" --prompt "The meaning of" --max-tokens 48
echo; echo "== spear ppl"
if [[ -f "$DATA" ]]; then
  build/spear ppl --model "$MODEL" --data "$DATA" --max-windows 64
else
  echo "($DATA not found: measuring on the project's own docs instead)"
  cat README.md docs/*.md > /tmp/spear_demo_text.txt
  build/spear ppl --model "$MODEL" --data /tmp/spear_demo_text.txt --ctx 256
fi
