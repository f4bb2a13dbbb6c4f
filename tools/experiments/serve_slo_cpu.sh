#!/usr/bin/env bash
# CPU version of issue 7's scheduler experiment: fixed prompt chunks vs the ITL-SLO chunking, same load.
# Run from the repository root after scripts/build.sh; needs ../shared/data/test.txt and curl.
set -u
# THREADS=N: the server's (and the latency table's) CPU threads, leaving the other cores to the load generator.
M=models/ref-llama-23m; OUT=bench/results/serve-cpu${THREADS:+-t$THREADS}; mkdir -p $OUT
T=${THREADS:+--threads $THREADS}
LT=$OUT/latency-table-ref-llama-23m-cpu.json
./build/spear tune -m $M --out $LT --max-tokens 512 --reps 5 $T
port=18200
for cfg in "chunk512:--chunk 512" "chunk256:--chunk 256" "chunk128:--chunk 128" "chunk64:--chunk 64" "slo60:--chunk 512 --slo-itl-ms 60 --latency-table $LT"; do
  name=${cfg%%:*}; args=${cfg#*:}; port=$((port+1))
  ./build/spear serve -m $M --port $port --max-running 16 --max-context 512 $T $args > /tmp/slo-$name.log 2>&1 &
  pid=$!
  for i in $(seq 50); do curl -sf localhost:$port/health >/dev/null && break; sleep 0.2; done
  ./build/spear bench serve --url http://127.0.0.1:$port --tokenizer $M --data ../shared/data/test.txt --rate 3 \
    --requests 90 --concurrency 90 --prompt-min 64 --prompt-max 256 --out-min 16 --out-max 48 --seed 5 \
    --slo-itl-ms 60 --out $OUT/slo-exp-$name.json --json > /dev/null 2>&1
  kill -INT $pid; wait $pid 2>/dev/null
  python3 -c "
import json; r=json.load(open('$OUT/slo-exp-$name.json'))['runs'][0]
print(f\"$name: ok {r['completed']} failed {r['failed']} | TTFT p50 {r['ttft_ms']['p50']:.0f} p99 {r['ttft_ms']['p99']:.0f} ms | ITL p50 {r['itl_ms']['p50']:.0f} p99 {r['itl_ms']['p99']:.0f} ms | TPOT p50 {r['tpot_ms']['p50']:.1f} | goodput {r['goodput_rps']:.2f} req/s | {r['output_token_throughput']:.0f} tok/s\")"
done
