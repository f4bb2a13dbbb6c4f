#!/usr/bin/env bash
# Load: 500 concurrent streaming clients on the CPU backend, 30% of them leaving mid-stream, twice. Every
# request must end (a result, or the client's own disconnect), no request may fail, the KV cache must be empty
# after each run, and the process's memory must stay flat between the runs (< 5% growth).
# usage: load_test.sh SPEAR_BINARY MODEL_DIR OUT_JSON
set -euo pipefail
spear=$1 model=$2 out=$3
"$spear" bench serve -m "$model" --requests 500 --concurrency 500 --prompt-min 8 --prompt-max 64 --out-min 4 \
  --out-max 24 --disconnect 0.3 --repeat 2 --max-running 32 --max-context 128 --seed 3 --out "$out" --json >/dev/null
python3 - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
runs = d["runs"]
for i, r in enumerate(runs, 1):
    s = r["server"]
    print(f"run {i}: completed {r['completed']}, disconnected {r['disconnected']}, failed {r['failed']}, "
          f"server finished {s['finished']}, KV blocks in use {s['kv_blocks_used']}, RSS {s['rss_mb']:.1f} MB")
    assert r["failed"] == 0, f"run {i}: {r['failed']} requests failed: {r['failed_by_status']}"
    assert r["completed"] + r["disconnected"] == r["requests"], f"run {i}: requests lost"
    assert s["finished"] == 500 * i, f"run {i}: the server finished {s['finished']} requests"
    assert s["kv_blocks_used"] == 0 and s["idle"], f"run {i}: KV blocks left in use"
    # Every completed request streamed text; a held-back token joins the next event, never more than that.
    assert r["text_events"] >= r["completed"], f"run {i}: {r['text_events']} text events"
    assert 1.0 <= r["tokens_per_text_event"] < 2.0, f"run {i}: {r['tokens_per_text_event']} tokens per event"
    # ITL per token splits an event's gap over its tokens: at least as many samples, none longer on average.
    assert r["itl_token_samples"] >= r["itl_samples"] > 0, f"run {i}: {r['itl_token_samples']} / {r['itl_samples']}"
    assert r["itl_token_ms"]["mean"] <= r["itl_ms"]["mean"] * (1 + 1e-9), f"run {i}: per-token ITL above per-event"
growth = runs[-1]["server"]["rss_mb"] / runs[0]["server"]["rss_mb"] - 1
print(f"RSS growth between runs: {100 * growth:.2f}%")
assert growth < 0.05, "memory grows across runs"
PY
