#!/usr/bin/env bash
# The quantization quality table of the README: FP32, RTN and GPTQ at W4 and W3, per channel and g128,
# perplexity on valid.txt and test.txt (reference.json protocol) and package sizes.
#   tools/eval_quant_table.sh SPEAR_BINARY DATA_DIR OUT_DIR [MODEL_DIR]
# DATA_DIR holds valid.txt, test.txt and calib.txt (../shared/data). Writes OUT_DIR/results.jsonl and
# OUT_DIR/table.md.
set -euo pipefail
SPEAR=$1; DATA=$2; OUT=$3; MODEL=${4:-models/ref-llama-23m}
mkdir -p "$OUT/pkgs"; : > "$OUT/results.jsonl"
export SPEAR_PROGRESS=0
run_ppl() {  # name model
  for split in valid test; do
    "$SPEAR" ppl --model "$2" --data "$DATA/$split.txt" --json |
      python3 -c "import json,sys; j=json.load(sys.stdin); j['name']='$1'; j['split']='$split'; print(json.dumps(j))" >> "$OUT/results.jsonl"
  done
}
[[ ${SKIP_FP32:-0} == 1 ]] || run_ppl fp32 "$MODEL"
for method in ${METHODS:-rtn gptq}; do
  for bits in 4 3; do
    for group in -1 128; do
      name="$method-w$bits-g$group"
      calib=(); [[ $method == gptq ]] && calib=(--calib "$DATA/calib.txt" --calib-samples 64 --calib-len 512 --seed 0)
      "$SPEAR" quantize --model "$MODEL" --out "$OUT/pkgs/$name" --method $method --bits $bits --group $group "${calib[@]}" --json \
        | python3 -c "import json,sys; j=json.load(sys.stdin); print(json.dumps({'name':'$name','quantize_seconds':j['seconds'],'package_bytes':j['package_bytes']}))" >> "$OUT/results.jsonl"
      run_ppl "$name" "$OUT/pkgs/$name"
      rm -rf "$OUT/pkgs/$name"
    done
  done
done
python3 - "$OUT" <<'PY'
import json, sys, collections
out = sys.argv[1]
rows = collections.OrderedDict()
for line in open(f"{out}/results.jsonl"):
    j = json.loads(line)
    r = rows.setdefault(j["name"], {})
    if "split" in j: r[j["split"]] = j["ppl"]
    else: r.update(j)
with open(f"{out}/table.md", "w") as f:
    f.write("| model | valid.txt | test.txt | package MB | quantize s |\n| --- | --- | --- | --- | --- |\n")
    for name, r in rows.items():
        mb = f"{r['package_bytes']/1e6:.2f}" if "package_bytes" in r else "-"
        qs = f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "-"
        f.write(f"| {name} | {r.get('valid', float('nan')):.4f} | {r.get('test', float('nan')):.4f} | {mb} | {qs} |\n")
print(open(f"{out}/table.md").read())
PY
