#!/usr/bin/env bash
# Issue 7's scheduler experiment: the same Poisson load against `spear serve` with fixed prompt chunks and
# with the ITL-SLO chunking (latency table measured at start-up, compensators included), one server process
# per configuration. Runs on any device; on the GPU with a random 8B-shaped W4 model that borrows the
# reference tokenizer (tools/device/cuda_run.sh stage serve:LIKE), on the CPU with the reference model.
#
#   MODEL=DIR OUT=DIR [DEVICE=cuda] [DENSITY=0.38] [RATE=16] [N=160] [SLOS="16 22"] [CHUNKS="512 256 128 64"]
#   [PROMPT="128 768"] [OUTPUT="32 96"] [MAX_RUNNING=64] [MAX_CONTEXT=1024] [EXTRA="--threads 1"] \
#   [EXTRA_CONFIGS="name:server args;..."] \
#     bash tools/experiments/serve_slo.sh
# Needs python3 (health polling, the summary) and ../shared/data/test.txt (prompt text).
set -u
BIN=${BIN:-./build/spear}
: "${MODEL:?MODEL=model directory}" "${OUT:?OUT=results directory}"
DEVICE=${DEVICE:-cpu}; DENSITY=${DENSITY:-0}; RATE=${RATE:-16}; N=${N:-160}
SLOS=${SLOS-16 22}; CHUNKS=${CHUNKS-512 256 128 64}  # set empty to skip
read -r PMIN PMAX <<< "${PROMPT:-128 768}"; read -r OMIN OMAX <<< "${OUTPUT:-32 96}"
MAX_RUNNING=${MAX_RUNNING:-64}; MAX_CONTEXT=${MAX_CONTEXT:-1024}; EXTRA=${EXTRA:-}
DATA=${DATA:-../shared/data/test.txt}
mkdir -p "$OUT"
port=${PORT:-18300}
configs=()
for c in $CHUNKS; do configs+=("chunk$c:--chunk $c"); done
for s in $SLOS; do configs+=("slo$s:--chunk 512 --slo-itl-ms $s --latency-table-out $OUT/table-d${DENSITY}-slo$s.json"); done
# EXTRA_CONFIGS: more "NAME:ARGS" entries (semicolon-separated), e.g. "slo22q95:--chunk 512 --slo-itl-ms 22 --slo-quantile 0.95";
# ARGS may start with NAME=VALUE words, the server's environment (e.g. "slo22x:SPEAR_POOL_EXACT=1 --slo-itl-ms 22")
IFS=';' read -r -a extra_configs <<< "${EXTRA_CONFIGS:-}"
for c in "${extra_configs[@]}"; do [[ -n "$c" ]] && configs+=("$c"); done
tag="d${DENSITY}"
for cfg in "${configs[@]}"; do
  name=${cfg%%:*}; args=${cfg#*:}; port=$((port + 1))
  log="$OUT/serve-$tag-$name.log"
  envs=()  # leading NAME=VALUE words of a configuration's args are the server's environment
  read -r -a words <<< "$args"
  while [[ ${#words[@]} -gt 0 && ${words[0]} =~ ^[A-Z_][A-Z0-9_]*= ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  args="${words[*]}"
  env "${envs[@]}" "$BIN" serve -m "$MODEL" --device "$DEVICE" --port $port --max-running "$MAX_RUNNING" --max-context "$MAX_CONTEXT" \
    --ec-density "$DENSITY" --iteration-log "$OUT/iters-$tag-$name.jsonl" $EXTRA $args > "$log" 2>&1 &
  pid=$!
  python3 - "$port" <<'PY' || { echo "$name: server did not become ready (see $log)"; kill $pid; wait $pid; continue; }
import sys, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.25)
sys.exit(1)
PY
  timeout 240 "$BIN" bench serve --url "http://127.0.0.1:$port" --tokenizer "$MODEL" --data "$DATA" --rate "$RATE" \
    --requests "$N" --concurrency "$N" --prompt-min "$PMIN" --prompt-max "$PMAX" --out-min "$OMIN" --out-max "$OMAX" \
    --seed 5 $(echo "$SLOS" | awk '$1 {print "--slo-itl-ms", $1}') --out "$OUT/slo-$tag-$name.json" --json > /dev/null 2>&1
  python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(
    'http://127.0.0.1:$port/metrics', timeout=10).read().decode())" > "$OUT/metrics-$tag-$name.txt" 2>/dev/null
  kill -INT $pid; wait $pid 2>/dev/null
  python3 - "$OUT/slo-$tag-$name.json" "$name" "$DENSITY" "$OUT/metrics-$tag-$name.txt" <<'PY' | tee -a "$OUT/summary.txt"
import json, re, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
except Exception as e:
    print(f"{sys.argv[2]}: no result ({e})"); sys.exit(0)
line = (f"EC {float(sys.argv[3]):.2f} {sys.argv[2]:>9}: ok {r['completed']} failed {r['failed']} | TTFT p50"
        f" {r['ttft_ms']['p50']:.0f} p99 {r['ttft_ms']['p99']:.0f} ms | ITL p50 {r['itl_ms']['p50']:.1f} p99"
        f" {r['itl_ms']['p99']:.1f} ms | ITL/token p50 {r['itl_token_ms']['p50']:.1f} p99 {r['itl_token_ms']['p99']:.1f} ms"
        f" ({r['tokens_per_text_event']:.3f} tokens/event) | TPOT p50 {r['tpot_ms']['p50']:.1f} ms | goodput {r['goodput_rps']:.2f} req/s"
        f" | {r['output_token_throughput']:.0f} tok/s")
# The SLO iterations (spear serve --slo-itl-ms): the latency table's predictions against the clock.
m = open(sys.argv[4]).read() if len(sys.argv) > 4 else ""
def val(pat):
    x = re.search(pat + r" ([0-9.e+-]+)", m)
    return float(x.group(1)) if x else None
for kind, label in (("", "SLO iterations"), ("mixed_", "mixed")):  # all decode iterations, then the filled ones
    n, pred, meas, over = (val(rf"spear_slo_{kind}iterations_total"),
                           val(rf'spear_slo_{kind}iteration_ms_total\{{kind="predicted"\}}'),
                           val(rf'spear_slo_{kind}iteration_ms_total\{{kind="measured"\}}'),
                           val(rf"spear_slo_{kind}iterations_over_total"))
    if n:
        line += (f" | {n:.0f} {label}: predicted {pred / n:.1f} ms, measured {meas / n:.1f} ms,"
                 f" {100 * over / n:.0f}% over")
if r.get("first_stream_error"):
    line += f" | first error: {r['first_stream_error']}"
print(line)
PY
done
