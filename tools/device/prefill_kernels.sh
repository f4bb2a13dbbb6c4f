#!/usr/bin/env bash
# Where a prefill's compensator time goes (issue 6, goal 3): per-kernel GPU times of one LIKE-shaped W4 model's
# prefill of P tokens (default 512) with random ECs on DENSITY (default 0.38) of the linears on the overlapped path
# and without ECs, by nsys when the image has it, else by ncu (kernels serialized: durations only). Also the
# per-shape EC path times of `spear tune` at 512 and 2048 tokens. Run after cuda_run.sh has unpacked the bundle:
#   bash tools/device/prefill_kernels.sh llama-3.2-1b   (writes into $OUT/prefill-kernels/)
set -u
like=${1:-llama-3.2-1b} P=${P:-512} D=${DENSITY:-0.38}
export LD_LIBRARY_PATH=$PWD/.devrun/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=$PWD/.devrun/bin
O=$OUT/prefill-kernels
mkdir -p "$O"
M=/tmp/$like-w4
[[ -d $M ]] || { "$BIN/spear" make-model --like "$like" --random --out "$M.bf16" --quantize-out "$M" 2>&1 | tail -1; rm -rf "$M.bf16"; }
echo "== spear tune at 512 and 2048 tokens (ECs on every linear)"
timeout 200 "$BIN/spear" tune --device cuda -m "$M" --no-latency-table --ec-density 1 --ec-rank 16 --ec-gate 8 \
  --ec-tokens 512,2048 --ec-dispatch-out "$O/ec_dispatch-prefill.json" 2>&1 | tee "$O/ec_tune-prefill.txt" | tail -12
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
for d in 0 $D; do
  run=("$BIN/spear" bench decode --device cuda -m "$M" --batch 1 --prompt "$P" --steps 2 --ec-density "$d" --ec-paths overlapped)
  if [[ -n $NSYS ]]; then
    echo "== nsys: density $d"
    "$NSYS" profile --trace=cuda --force-overwrite true -o "$O/prof-d$d" "${run[@]}" --prefill-reps 3 > "$O/nsys-d$d.log" 2>&1
    "$NSYS" stats --report cuda_gpu_kern_sum --format csv -o "$O/kern-d$d" "$O/prof-d$d.nsys-rep" > /dev/null 2>&1
    rm -f "$O"/prof-d$d.{nsys-rep,sqlite}
    head -25 "$O"/kern-d$d*.csv
  else
    echo "== ncu: density $d (no nsys here)"
    timeout 240 ncu --metrics gpu__time_duration.sum --launch-count 600 --csv "${run[@]}" --prefill-reps 1 > "$O/ncu-d$d.csv" 2> "$O/ncu-d$d.log"
    python3 - "$O/ncu-d$d.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    v = float(r[vi].replace(",", "")); v *= {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(r[ui], 1)
    k = r[ki][:90]; tot[k][0] += 1; tot[k][1] += v
print("kernels: %d, sum %.1f us" % (sum(c for c, _ in tot.values()), sum(t for _, t in tot.values())))
for k, (c, t) in sorted(tot.items(), key=lambda x: -x[1][1])[:22]: print("%5d %10.1f us %8.2f us/call  %s" % (c, t, t / c, k))
PY
  fi
done
