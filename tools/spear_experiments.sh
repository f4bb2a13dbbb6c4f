#!/usr/bin/env bash
# Runs several `spear calibrate` configurations in parallel, then scores every package in one `spear eval`
# table per split (the README's SPEAR tables come from this).
#   tools/spear_experiments.sh SPEAR MODEL DATA_DIR OUT CONFIG_FILE
# CONFIG_FILE: one configuration per line, "name calibrate-arguments..." ('#' starts a comment); the
# arguments are added to `spear calibrate --model MODEL --out OUT/pkgs/name`.
# Environment: JOBS parallel calibrations (default 4), THREADS per calibration (default nproc / JOBS),
# SPLITS (default "valid"), WINDOWS (0 = whole file, the default), EVAL_THREADS (default nproc),
# DROP_WEIGHTS=1 deletes the packages' quantized weights at the end (keeps compensators and reports).
set -euo pipefail
SPEAR=$(realpath "$1"); MODEL=$2; DATA=$3; OUT=$4; CONFIGS=$5
JOBS=${JOBS:-4}; NPROC=$(nproc); THREADS=${THREADS:-$(( NPROC / JOBS > 0 ? NPROC / JOBS : 1 ))}
mkdir -p "$OUT/pkgs" "$OUT/logs"
export SPEAR_PROGRESS=0 SPEAR MODEL OUT THREADS
grep -v '^\s*#' "$CONFIGS" | grep -v '^\s*$' > "$OUT/configs.txt"
run_one() {
  local name=$1; shift
  local t0=$(date +%s)
  if OMP_NUM_THREADS=$THREADS "$SPEAR" calibrate --model "$MODEL" --out "$OUT/pkgs/$name" "$@" --json \
       > "$OUT/logs/$name.json" 2> "$OUT/logs/$name.err"; then
    echo "calibrated $name in $(( $(date +%s) - t0 )) s"
  else
    echo "FAILED $name: $(tail -n 3 "$OUT/logs/$name.err")"
  fi
}
export -f run_one
# One line per job; xargs runs JOBS of them at a time.
tr '\n' '\0' < "$OUT/configs.txt" | xargs -0 -P "$JOBS" -I{} bash -c 'run_one {}'
pkgs=()
while read -r name _; do [[ -f "$OUT/pkgs/$name/manifest.json" ]] && pkgs+=("$OUT/pkgs/$name"); done < "$OUT/configs.txt"
for split in ${SPLITS:-valid}; do
  OMP_NUM_THREADS=${EVAL_THREADS:-$NPROC} "$SPEAR" eval --model "$MODEL" --data "$DATA/$split.txt" \
    --windows "${WINDOWS:-0}" -p "${pkgs[@]}" --json > "$OUT/eval-$split.json"
  OMP_NUM_THREADS=1 python3 - "$OUT/eval-$split.json" <<'PY' | tee "$OUT/table-$split.txt"
import json, sys
j = json.load(open(sys.argv[1]))
print(f"{j['data']}: {j['tokens_scored']} tokens")
print(f"{'model':<26} {'ppl':>9} {'gap%':>6} {'EC%':>6} {'KLmean':>7} {'p10':>7} {'p50':>7} {'p90':>7}")
for r in j["rows"]:
    kl = r.get("kl", {})
    f = lambda k: f"{kl[k]:.4f}" if k in kl else "-"
    gap = f"{r['gap_closed_pct']:.1f}" if "gap_closed_pct" in r else "-"
    ec = f"{100*r['ec_fraction']:.3f}" if "ec_fraction" in r else "-"
    print(f"{r['name'][:26]:<26} {r['ppl']:>9.4f} {gap:>6} {ec:>6} {f('mean'):>7} {f('p10'):>7} {f('p50'):>7} {f('p90'):>7}")
PY
done
if [[ ${DROP_WEIGHTS:-0} == 1 ]]; then rm -f "$OUT"/pkgs/*/model.safetensors "$OUT"/pkgs/*/tokenizer.json; fi
