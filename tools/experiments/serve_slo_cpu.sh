#!/usr/bin/env bash
# CPU version of issue 7's scheduler experiment (tools/experiments/serve_slo.sh with the bundled model): fixed
# prompt chunks vs the ITL-SLO chunking, 90 requests at 3 req/s, prompts 64-256 and outputs 16-48 tokens,
# 16 KV slots, SLO 60 ms. Run from the repository root after scripts/build.sh; needs ../shared/data/test.txt.
# THREADS=N: the server's CPU threads (and its start-up latency table's), leaving the other cores to the load.
# (Results before 2026-11-29 came from an earlier form of this script that wrote the table with `spear tune`.)
set -u
MODEL=models/ref-llama-23m OUT=${OUT:-bench/results/serve-cpu${THREADS:+-t$THREADS}} DEVICE=cpu DENSITY=0 RATE=3 \
  N=90 SLOS=60 CHUNKS="512 256 128 64" PROMPT="64 256" OUTPUT="16 48" MAX_RUNNING=16 MAX_CONTEXT=512 \
  EXTRA="${THREADS:+--threads $THREADS}" PORT=18200 exec bash "$(dirname "$0")/serve_slo.sh"
