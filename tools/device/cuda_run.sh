#!/usr/bin/env bash
# One device call of the CUDA work (issue 5): the binaries are built here beforehand (portable, CUDA on, plots
# off; tools/device/stage.sh copies them and their non-CUDA shared libraries into .devrun/), so the GPU machine
# spends its time on tests and benchmarks only. Stages (any order, several allowed):
#   tests   the GPU test binary (label gpu) and the CUDA test of every kernel
#   memcheck compute-sanitizer memcheck on the GPU tests
#   gemm    bench_w4_gemm: W4A16 vs cuBLAS BF16 on the 1B and 8B linear shapes
#   gemmab  bench_w4_gemm --decode (8B shapes, M <= 16) once per setting of GEMM_RUNS (NAME=VALUE[,NAME=VALUE...]),
#           GEMM_PASSES passes (default 2) alternating
#   sweep   bench_w4_gemm --quick under each forced decode plan (SPEAR_W4_DECODE_ROWS / _SPLITS)
#   ppl     GPU perplexity of the reference model and its RTN W4 package on all of test.txt
#   bulkab:LIKE  bench decode of a LIKE-shaped W4 model at batch 1 and 8, decode plans tuned with and without the
#             bulk-copy kernel (SPEAR_W4_BULK=1 / 0, twice each, alternating)
#   ab:LIKE   bench decode of a LIKE-shaped W4 model at batch AB_BATCH (default 1,8), one process per entry of
#             AB_RUNS (each NAME=VALUE[,NAME=VALUE...], e.g. "SPEAR_FUSED_MLP=0 SPEAR_FUSED_MLP=1"), one JSON each
#   ecab:LIKE issue 6 A/B: one LIKE-shaped W4 model, then per entry of ECAB_RUNS (NAME=VALUE[,NAME=VALUE...]) a
#             spear tune (EC dispatch table) and bench decode with ECs (EC_TOKENS, EC_BATCH, EC_DENS, EC_PATHS;
#             EC_GATE: the random ECs' gate width, default 8, 0 static)
#   tunelog:LIKE  every decode plan's tuning time (SPEAR_W4_TUNE_LOG=1) in a bench decode of a LIKE-shaped W4 model at
#             batch TL_BATCH (default 1) with fused ECs on TL_DENS (default 0.6): best ring plan vs bulk per shape
#   e2e:LIKE  make-model --like LIKE (bf16 + W4 package) and bench decode at batch 1, 8, 32
#   ec:LIKE   issue 6 on a LIKE-shaped W4 model: spear tune (EC dispatch table, random ECs on every linear),
#             then bench decode at batch 1, 8, 32 with random ECs on 15/38/60% of the linears under the naive,
#             fused, overlapped and dispatched (auto + table) paths, and prefill at 512 and 2048 tokens
#             (EC_TOKENS, EC_BATCH, EC_DENS, EC_PATHS and EC_PREFILL narrow the grid; EC_PREFILL= skips prefill)
#             EC_TUNE_PER_DENSITY=1: one table per density, tuned with the ECs of that density's rows (the same
#             seeded placement), as `spear tune` on a package tunes for its own compensators; one bench per density
#   pdl:LIKE  bench decode of a LIKE-shaped bf16 + W4 pair at batch 1, 8, 32 with PDL on every kernel (default)
#             and with SPEAR_PDL=0 (only the W4 kernels use it), same run
#   kprof:LIKE  ncu times every kernel of a W4 decode step at batch 1 alone (tools/device/kernel_breakdown.py;
#             decode plans untuned unless KPROF_TUNE=1: the tuner's timings mean nothing under ncu)
#             KPROF_EC=0.6: with fused random ECs on that share of the linears (--ec-density, --ec-paths fused)
#   ncuk    ncu sections (speed of light, warp stalls, compute, memory, occupancy) of the kernels matching
#           NCU_KERNEL (a regex over demangled names, default "gemm_kernel<.int.16": ncu writes template arguments as (int)16) in bench_w4_gemm $NCU_ARGS
#           (default --prefill): NCU_SKIP launches skipped (default 3), NCU_COUNT profiled (default 2)
#   wprefill  bench_w4_gemm --prefill: W4 kernel vs dequantize + cuBLAS vs cuBLAS BF16 at M = 32..2048
#   prefill:LIKE  prefill of 512 and 2048 tokens, bf16 vs W4 with the W4 prefill GEMMs through dequantize +
#             cuBLAS (default) and through the W4 kernel (SPEAR_W4_DEQUANT_MIN_M=0)
#   ecprefill:LIKE  prefill of 512 and 2048 tokens of a LIKE-shaped W4 model with random ECs on ECP_DENSITY (default
#             0.38) of the linears: ECP_PATHS (default naive,overlapped,auto: the built-in rule) against no ECs, one
#             process per entry of ECP_RUNS (NAME=VALUE[,NAME=VALUE...]; default one plain run) (reuses /tmp/LIKE-w4)
#   serve:LIKE  issue 7's scheduler experiment on a LIKE-shaped random W4 model (the reference tokenizer
#             lent, tools/experiments/serve_slo.sh): fixed chunks vs the ITL-SLO chunking at 16 req/s with
#             random ECs on SERVE_DENSITIES (default 0.38) of the linears; CHUNKS (default "512 256 128 64")
#             or, per density, CHUNKS_0_15 etc. name the fixed chunks to run beside the SLO ones
#   allreduce bench_allreduce (issue 8): the P2P dual-write reduction vs NCCL all-reduce at 8 KB - 1 MB, same run
#   racecheck compute-sanitizer racecheck and memcheck on the P2P and fused-tail tests (RACECHECK_FILTER)
#   tpcheck   issue 8 on the reference model, its RTN W4 package and the staged SPEAR package: perplexity and
#             greedy text at --tp 1 and --tp 2 (needs 2 GPUs)
#   tp:LIKE   issue 8 on a LIKE-shaped random W4 model: greedy ids at --tp 1 vs 2, then bench decode at batch 1
#             and 8 with random ECs on 0 and TP_DENSITIES (default 0.15) of the linears at --tp 1 and at --tp 2
#             under each --tp-reduce (nccl, p2p, fused, and fused-push: fused with SPEAR_TP_GEMM_PUSH=1);
#             TP_RUNS picks the runs (e.g. "1:auto 2:p2p"), TP_CHECK=0
#             skips the perplexity and greedy comparisons
#   ecppl     GPU vs CPU perplexity of a SPEAR package (calibrated here, fast preset) under each EC path
#   tpprof:LIKE  per-op GPU times (SPEAR_CUDA_PROFILE=1, eager) of a LIKE-shaped random W4 model at batch 1, without
#             and with random ECs on TPPROF_DENSITY (default 0.15) of the linears, at --tp 1 and at --tp 2 (fused tail);
#             -v lists the EC path of each compensated linear
#   tpkinds:LIKE  bench decode (graphs) of a LIKE-shaped random W4 model at batch TPK_BATCH (default 1) with random ECs
#             on TPK_DENSITY (default 0.25) of one group of module kinds at a time (TPK_GROUPS, default row-parallel
#             o+down, q+k+v, gate+up; an entry KINDS@D sets its own density, KINDS "all" every linear) against none,
#             at --tp TPK_TP (default "1 2"; --tp-reduce fused at 2)
# Everything lands in $OUT/results.tgz (results-$TAG.tgz with TAG set, so that several calls of one device run,
# e.g. under different SPEAR_* settings, keep their files apart) and the log on stdout.
set -u
export LD_LIBRARY_PATH=$PWD/.devrun/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# NCCL is loaded at run time (nccl_loader.h): the image's pip package has it when the toolkit does not.
if [[ -z "${SPEAR_NCCL_LIBRARY:-}" ]] && ! ldconfig -p | grep -q libnccl.so.2 && [[ ! -f /usr/local/cuda/lib64/libnccl.so.2 ]]; then
  SPEAR_NCCL_LIBRARY=$(python3 -c "import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], 'lib', 'libnccl.so.2'))" 2>/dev/null)
  export SPEAR_NCCL_LIBRARY
fi
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on these machines (KINDS.md)
tar xJf .devrun/carry/bundle.tar.xz -C .devrun
BIN=$PWD/.devrun/bin
R=$(mktemp -d /tmp/spear-run.XXXX)
mkdir -p ../shared/data ../shared/models/ref-llama-23m
cp .devrun/data/test.txt ../shared/data/ 2>/dev/null
[[ -f .devrun/golden_logits.safetensors ]] && cp .devrun/golden_logits.safetensors ../shared/models/ref-llama-23m/
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
t() { echo "[$(date +%T)] $*"; }
# w4_model LIKE DIR: a LIKE-shaped random W4 package at DIR, made unless an earlier stage of this call left one there
# (the bf16 checkpoint it is quantized from is removed).
w4_model() {
  [[ -d "$2" ]] && return
  "$BIN/spear" make-model --like "$1" --random --out "$2.bf16" --quantize-out "$2" 2>&1 | tail -1
  rm -rf "$2.bf16"
}
# The results come back even when the caller's timeout stops the run part-way.
finish() { (cd "$R" && rm -rf ref-w4 ref-spear && tar czf "$OUT/results${TAG:+-$TAG}.tgz" .); }
trap 'finish; exit 124' TERM
for stage in "$@"; do
  case $stage in
    tests)
      t "gpu tests"
      timeout ${TESTS_S:-240} "$BIN/test_cuda_ops" --gtest_color=no ${TESTS_FILTER:+--gtest_filter="$TESTS_FILTER"} 2>&1 | tee "$R/tests.log" | grep -E "^\[  (FAILED|PASSED|  OK|SKIPPED) |cuda vs|ppl cuda|Failure|Expected|Which is|actual|rel err|rel l2" | head -80 ;;
    memcheck)
      t "compute-sanitizer memcheck"
      timeout ${MEMCHECK_S:-150} compute-sanitizer --tool memcheck --leak-check no "$BIN/test_cuda_ops" \
        --gtest_filter="${MEMCHECK_FILTER:--*Perplexity*:*Large*:*Rotating*:*DecodeMatchesCpu*}" > "$R/memcheck.log" 2>&1
      echo "memcheck exit $?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$R/memcheck.log" | tail -5 ;;
    racecheck)
      t "compute-sanitizer racecheck and memcheck: the P2P reduction and the fused tail (staging reuse across calls)"
      for tool in racecheck memcheck; do
        timeout ${RACECHECK_S:-150} compute-sanitizer --tool $tool "$BIN/test_cuda_ops" \
          --gtest_filter="${RACECHECK_FILTER:-CudaP2pReduce.*:CudaTpTail.*:CudaTp.*}" > "$R/$tool-tp.log" 2>&1
        echo "$tool exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$R/$tool-tp.log" | tail -5
      done ;;
    gemm)
      t "bench_w4_gemm"
      "$BIN/bench_w4_gemm" --out "$R/w4_gemm.json" 2>&1 | tee "$R/w4_gemm.log" | tail -80 ;;
    gemmab)
      t "bench_w4_gemm --decode, one process per setting of GEMM_RUNS (twice each, alternating): ${GEMM_RUNS:-}"
      for pass in $(seq 1 ${GEMM_PASSES:-2}); do
        i=0
        for run in ${GEMM_RUNS:-}; do  # NAME=VALUE[,NAME=VALUE...]
          i=$((i + 1))
          echo "== pass $pass run$i: $run" | tee -a "$R/gemmab.log"
          env ${run//,/ } "$BIN/bench_w4_gemm" --decode --out "$R/gemmab-run$i-pass$pass.json" 2>&1 \
            | grep -E '^llama|goal' | tee -a "$R/gemmab.log"
        done
      done ;;
    sweep)
      t "decode plan sweep (bench_w4_gemm --quick under forced plans)"
      for env in "" SPEAR_W4_DECODE_ROWS=1 SPEAR_W4_DECODE_ROWS=2 SPEAR_W4_DECODE_ROWS=4 SPEAR_W4_DECODE_ROWS=8 \
                 SPEAR_W4_DECODE_SPLITS=1 SPEAR_W4_DECODE_SPLITS=2 SPEAR_W4_DECODE_SPLITS=4; do
        echo "== ${env:-default}" | tee -a "$R/sweep.log"
        env $env "$BIN/bench_w4_gemm" --quick --reps 20 --out "$R/sweep-${env:-default}.json" 2>&1 \
          | grep -E '^llama' | awk '{printf "%s %s %s %s M%s %s b2b %s %s\n", $1, $2, $3, $4, $5, $6, $(NF-1), $NF}' \
          | tee -a "$R/sweep.log"
      done ;;
    ppl)
      t "ppl"
      "$BIN/spear" quantize --model models/ref-llama-23m --out "$R/ref-w4" > "$R/quant.log" 2>&1
      for m in models/ref-llama-23m "$R/ref-w4"; do
        "$BIN/spear" ppl --model "$m" --data ../shared/data/test.txt --device cuda --json | tee -a "$R/ppl.jsonl"
      done ;;
    profile:*)
      like=${stage#profile:}
      t "per-op profile $like"
      "$BIN/spear" make-model --like "$like" --random --out "/tmp/p-$like" --quantize-out "/tmp/p-$like-w4" 2>&1 | tail -1
      for m in "/tmp/p-$like" "/tmp/p-$like-w4"; do
        SPEAR_CUDA_PROFILE=1 "$BIN/spear" bench decode --device cuda -m "$m" --batch 1 --steps 16 2>&1 | tee -a "$R/profile-$like.log" | tail -22
      done
      rm -rf "/tmp/p-$like" "/tmp/p-$like-w4" ;;
    ncu)
      t "ncu on the W4A16 kernel"
      ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 40 --launch-count 4 --section SpeedOfLight \
        --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis "$BIN/bench_w4_gemm" --quick \
        > "$R/ncu.log" 2>&1
      grep -E "w4a16|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size|Theoretical Occ|Waves" "$R/ncu.log" | head -60 ;;
    ec:*)
      like=${stage#ec:}
      t "make-model $like (W4)"
      "$BIN/spear" make-model --like "$like" --random --out "/tmp/$like" --quantize-out "/tmp/$like-w4" 2>&1 | tail -2
      rm -rf "/tmp/$like"
      if [[ ${EC_TUNE_PER_DENSITY:-0} == 1 ]]; then
        for d in $(tr ',' ' ' <<< "${EC_DENS:-0,0.15,0.38,0.6}"); do
          [[ $d == 0 ]] && paths=fused || paths=${EC_PATHS:-naive,fused,overlapped,auto}  # density 0: the W4 row
          if [[ $d != 0 ]]; then
            t "spear tune: EC dispatch table $like, ECs on $d of the linears"
            timeout 200 "$BIN/spear" tune --device cuda -m "/tmp/$like-w4" --no-latency-table --ec-density $d --ec-rank 16 \
              --ec-gate 8 --ec-tokens ${EC_TOKENS:-1,8,32,512,2048} --ec-dispatch-out "$R/ec_dispatch-$like-d$d.json" 2>&1 \
              | tee "$R/ec_tune-$like-d$d.txt" | tail -8
          fi
          t "bench decode with ECs $like, density $d"
          timeout 300 "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch ${EC_BATCH:-1,8,32} --steps 48 \
            --ec-density $d --ec-paths $paths $([[ $d != 0 ]] && echo --ec-dispatch "$R/ec_dispatch-$like-d$d.json") \
            --out "$R/ec_decode-$like-d$d.json" 2>&1 | tee "$R/ec_decode-$like-d$d.txt" | grep -v "ms/step$" | tail -16
        done
      else
      t "spear tune: EC dispatch table $like"
      timeout 200 "$BIN/spear" tune --device cuda -m "/tmp/$like-w4" --no-latency-table --ec-density 1 --ec-rank 16 --ec-gate 8 \
        --ec-tokens ${EC_TOKENS:-1,8,32,512,2048} --ec-dispatch-out "$R/ec_dispatch-$like.json" 2>&1 | tee "$R/ec_tune-$like.txt" | tail -40
      t "bench decode with ECs $like"
      timeout 300 "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch ${EC_BATCH:-1,8,32} --steps 48 \
        --ec-density ${EC_DENS:-0,0.15,0.38,0.6} --ec-paths ${EC_PATHS:-naive,fused,overlapped,auto} --ec-dispatch "$R/ec_dispatch-$like.json" \
        --out "$R/ec_decode-$like.json" 2>&1 | tee "$R/ec_decode-$like.txt" | grep -v "ms/step$" | tail -45
      fi
      for P in ${EC_PREFILL-512 2048}; do
        t "prefill $P tokens with ECs $like"
        "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch 1 --prompt $P --steps 2 --prefill-reps 5 \
          --ec-density 0,0.38 --ec-paths naive,overlapped,auto --ec-dispatch "$R/ec_dispatch-$like.json" \
          --out "$R/ec_prefill$P-$like.json" 2>&1 | tee "$R/ec_prefill$P-$like.txt" | grep -v "ms/step$" | tail -6
      done
      rm -rf "/tmp/$like-w4" ;;
    ecprefill:*)
      like=${stage#ecprefill:}
      w4_model "$like" "/tmp/$like-w4"
      for P in 512 2048; do
        i=0
        for run in ${ECP_RUNS:-default}; do  # NAME=VALUE[,NAME=VALUE...] per process
          i=$((i + 1)) sfx=$([[ -n "${ECP_RUNS:-}" ]] && echo "-run$i")
          t "prefill $P tokens with ECs $like ($run)"
          env $([[ $run != default ]] && echo "${run//,/ }") "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" \
            --batch 1 --prompt $P --steps 2 --prefill-reps 5 --ec-density 0,${ECP_DENSITY:-0.38} \
            --ec-paths ${ECP_PATHS:-naive,overlapped,auto} --out "$R/ec_prefill$P-$like$sfx.json" 2>&1 \
            | tee "$R/ec_prefill$P-$like$sfx.txt" | grep -v "ms/step$" | tail -6
        done
      done ;;
    serve:*)
      like=${stage#serve:}
      t "make-model $like with the reference tokenizer"
      "$BIN/spear" make-model --like "$like" --random --tokenizer models/ref-llama-23m --out "/tmp/s-$like" \
        --quantize-out "/tmp/s-$like-w4" ${SERVE_LAYERS:+--layers $SERVE_LAYERS} 2>&1 | tail -1
      rm -rf "/tmp/s-$like"
      for d in ${SERVE_DENSITIES:-0.38}; do
        t "serve experiment $like EC density $d"
        chunks_var="CHUNKS_${d//./_}"  # e.g. CHUNKS_0_15="": this density without the fixed-chunk runs
        BIN="$BIN/spear" MODEL="/tmp/s-$like-w4" OUT="$R/serve-$like" DEVICE=cuda DENSITY=$d \
          CHUNKS="${!chunks_var-${CHUNKS-512 256 128 64}}" bash tools/experiments/serve_slo.sh
      done
      grep -h "spear engine" "$R/serve-$like"/serve-*.log | sort | uniq -c | head -5
      rm -rf "/tmp/s-$like-w4" ;;
    allreduce)
      t "bench_allreduce (NCCL: ${SPEAR_NCCL_LIBRARY:-system})"
      timeout 120 "$BIN/bench_allreduce" --out "$R/allreduce.json" 2>&1 | tee "$R/allreduce.log" | tail -24 ;;
    tpcheck)
      t "tensor parallel vs one GPU: reference model, RTN W4, SPEAR package"
      "$BIN/spear" quantize --model models/ref-llama-23m --out "$R/ref-w4" > /dev/null 2>&1
      models="models/ref-llama-23m $R/ref-w4"
      if [[ -d .devrun/ref-spear ]]; then
        cp -r .devrun/ref-spear "$R/ref-spear" && cp "$R/ref-w4/model.safetensors" "$R/ref-spear/"
        models="$models $R/ref-spear"
      fi
      for m in $models; do
        for tp in 1 2; do  # the pairs of tp_gen.jsonl: tools/device/tp_compare.py
          export SPEAR_TP_P2P_TIMEOUT_MS=60000  # a P2P bug traps with a message instead of hanging the call
          timeout 120 "$BIN/spear" ppl --model "$m" --data ../shared/data/test.txt --max-windows 64 --device cuda --tp $tp \
            --json | tee -a "$R/tp_ppl.jsonl"
          timeout 120 "$BIN/spear" generate --model "$m" --device cuda --tp $tp --prompt "The meaning of life is" -n 48 \
            --margins --json | tee -a "$R/tp_gen.jsonl" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['tp'], d['output_ids'][:12], repr(d['text'][:60]))"
        done
      done
      python3 tools/device/tp_compare.py "$R/tp_gen.jsonl" ;;
    tp:*)
      like=${stage#tp:}
      t "make-model $like (random W4, reference tokenizer)"
      "$BIN/spear" make-model --like "$like" --random --tokenizer models/ref-llama-23m --out "/tmp/t-$like" \
        --quantize-out "/tmp/t-$like-w4" 2>&1 | tail -1
      rm -rf "/tmp/t-$like"
      [[ ${TP_CHECK:-1} == 1 ]] && for tp in 1 2; do  # logits: bf16 rounding moved the NLL by 1e-5..1e-4 (relative)
        timeout 180 "$BIN/spear" ppl --model "/tmp/t-$like-w4" --data ../shared/data/test.txt --max-windows 8 \
          --device cuda --tp $tp --json | tee -a "$R/tp_ppl-$like.jsonl" | python3 -c \
          "import json,sys; d=json.load(sys.stdin); print('tp', d['tp'], 'mean_nll %.6f' % d['mean_nll'])"
      done
      [[ ${TP_CHECK:-1} == 1 ]] && for tp in 1 2; do
        timeout 180 "$BIN/spear" generate --model "/tmp/t-$like-w4" --device cuda --tp $tp --prompt "The meaning of life is" \
          -n 32 --margins --json | tee -a "$R/tp_gen-$like.jsonl" > /dev/null
      done
      [[ ${TP_CHECK:-1} == 1 ]] && python3 tools/device/tp_compare.py "$R/tp_gen-$like.jsonl"
      for run in ${TP_RUNS:-1:auto 2:nccl 2:p2p 2:fused 2:fused-push}; do
        tp=${run%%:*} red=${run#*:} push=0
        [[ $red == fused-push ]] && red=fused push=1  # the W4 GEMM's epilogue dual-writes its rows
        t "bench decode $like --tp $tp --tp-reduce $red (SPEAR_TP_GEMM_PUSH=$push)"
        SPEAR_TP_GEMM_PUSH=$push timeout 300 "$BIN/spear" bench decode --device cuda -m "/tmp/t-$like-w4" --tp $tp \
          --tp-reduce $red --batch 1,8 \
          --steps 48 --ec-density "0,${TP_DENSITIES:-0.15}" --ec-paths auto --out "$R/tp_decode-$like-tp$tp-${run#*:}.json" \
          2>&1 | tee "$R/tp_decode-$like-tp$tp-${run#*:}.log" | grep -E "^(model|/tmp)"
      done
      rm -rf "/tmp/t-$like-w4" ;;
    tpkinds:*)
      like=${stage#tpkinds:}
      w4_model "$like" "/tmp/t-$like-w4"
      for tp in ${TPK_TP:-1 2}; do
        for entry in ${TPK_GROUPS:-o_proj,down_proj q_proj,k_proj,v_proj gate_proj,up_proj}; do
          g=${entry%@*} d=${TPK_DENSITY:-0.25}  # an entry KINDS@DENSITY sets its own density; KINDS "all": every linear
          [[ $entry == *@* ]] && d=${entry#*@}
          kinds=(--ec-modules "$g")
          [[ $g == all ]] && kinds=()
          t "bench decode $like --tp $tp, ECs on $d of $g"
          timeout 240 "$BIN/spear" bench decode --device cuda -m "/tmp/t-$like-w4" --tp $tp --tp-reduce fused \
            --batch ${TPK_BATCH:-1} --steps 48 --ec-density 0,$d "${kinds[@]}" --ec-paths auto \
            --out "$R/tpkinds-$like-tp$tp-${g//,/+}-$d.json" 2>&1 | tee "$R/tpkinds-$like-tp$tp-${g//,/+}-$d.log" | grep -E "^/tmp"
        done
      done ;;
    tpprof:*)
      like=${stage#tpprof:}
      t "make-model $like (random W4)"
      w4_model "$like" "/tmp/t-$like-w4"
      for tp in ${TPPROF_TP:-1 2}; do
        for d in 0 ${TPPROF_DENSITY:-0.15}; do
          t "per-op profile $like --tp $tp, EC density $d"
          SPEAR_CUDA_PROFILE=1 timeout 240 "$BIN/spear" bench decode --device cuda -m "/tmp/t-$like-w4" --tp $tp \
            --tp-reduce fused --batch 1 --steps 16 --ec-density $d --ec-paths auto -v \
            > "$R/tpprof-$like-tp$tp-d$d.log" 2>&1
          grep -E "^(op |linear|row_par|all_red|attention|rope|rms|add|swiglu|gather|lm|ec|/tmp)" \
            "$R/tpprof-$like-tp$tp-d$d.log" | head -60
        done
      done ;;
    ecppl)
      t "SPEAR package: the staged one (calibrate --preset fast) + its RTN weights rebuilt by spear quantize"
      if [[ -d .devrun/ref-spear ]]; then
        "$BIN/spear" quantize --model models/ref-llama-23m --out "$R/ref-rtn" > /dev/null 2>&1
        cp -r .devrun/ref-spear "$R/ref-spear" && cp "$R/ref-rtn/model.safetensors" "$R/ref-spear/" && rm -rf "$R/ref-rtn"
      else
        "$BIN/spear" calibrate --model models/ref-llama-23m --out "$R/ref-spear" --method rtn --bits 4 --budget 0.01 \
          --preset fast > "$R/calibrate.log" 2>&1; tail -2 "$R/calibrate.log"
      fi
      "$BIN/spear" ppl --model "$R/ref-spear" --data ../shared/data/test.txt --max-windows 128 --device cpu --json | tee -a "$R/ecppl.jsonl"
      for path in naive fused overlapped auto; do
        "$BIN/spear" ppl --model "$R/ref-spear" --data ../shared/data/test.txt --max-windows 128 --device cuda --ec-path $path --json \
          | tee -a "$R/ecppl.jsonl"
      done
      for path in naive fused overlapped; do  # decode steps: the fused path runs here (ppl windows are prefills)
        echo "== generate --ec-path $path" | tee -a "$R/ecgen.txt"
        "$BIN/spear" generate --model "$R/ref-spear" --device cuda --ec-path $path --prompt "The meaning of life is" \
          --max-tokens 48 2>/dev/null | tee -a "$R/ecgen.txt"
      done
      rm -rf "$R/ref-spear" ;;
    ncuk)
      t "ncu sections of ${NCU_KERNEL:-gemm_kernel<.int.16}"
      timeout 240 ncu --clock-control none --kernel-name-base demangled -k "regex:${NCU_KERNEL:-gemm_kernel<.int.16}" \
        --launch-skip ${NCU_SKIP:-3} --launch-count ${NCU_COUNT:-2} --section SpeedOfLight --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section InstructionStats --metrics "$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' \
        long_scoreboard short_scoreboard barrier mio_throttle math_pipe_throttle wait not_selected lg_throttle \
        dispatch_stall selected no_instruction imc_miss drain membar sleeping branch_resolving tex_throttle)sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active" \
        "$BIN/bench_w4_gemm" ${NCU_ARGS:---prefill} > "$R/ncuk.log" 2>&1
      grep -vE "^ +-+|^\s*$|bench_w4_gemm|^llama|^model|^prefill" "$R/ncuk.log" | grep -E "gemm_kernel|Throughput|Duration|stalled|hmma|Issue|Eligible|Active Warps|Registers|Occupancy|Bank|Executed Ipc|L1|L2|Shared" | head -120 ;;
    wprefill)
      t "bench_w4_gemm --prefill"
      "$BIN/bench_w4_gemm" --prefill --out "$R/w4_prefill.json" 2>&1 | tee "$R/w4_prefill.txt" | tail -32 ;;
    prefill:*)
      like=${stage#prefill:}
      t "make-model $like"
      "$BIN/spear" make-model --like "$like" --random --out "/tmp/$like" --quantize-out "/tmp/$like-w4" 2>&1 | tail -1
      for P in 512 2048; do
        for dq in 129 0; do
          t "prefill $P tokens $like SPEAR_W4_DEQUANT_MIN_M=$dq"
          SPEAR_W4_DEQUANT_MIN_M=$dq "$BIN/spear" bench decode --device cuda -m "/tmp/$like" -m "/tmp/$like-w4" --batch 1 \
            --prompt $P --steps 2 --prefill-reps 5 --out "$R/prefill$P-dq$dq-$like.json" 2>&1 \
            | tee "$R/prefill$P-dq$dq-$like.txt" | tail -3
        done
      done
      rm -rf "/tmp/$like" "/tmp/$like-w4" ;;
    pdl:*)
      like=${stage#pdl:}
      t "make-model $like"
      rm -rf "/tmp/$like" "/tmp/$like-w4"  # an earlier stage may have left its package
      "$BIN/spear" make-model --like "$like" --random --out "/tmp/$like" --quantize-out "/tmp/$like-w4" 2>&1 | tail -1
      for pdl in 1 0; do
        t "bench decode $like SPEAR_PDL=$pdl"
        SPEAR_PDL=$pdl "$BIN/spear" bench decode --device cuda -m "/tmp/$like" -m "/tmp/$like-w4" --batch 1,8,32 \
          --out "$R/decode-pdl$pdl-$like.json" 2>&1 | tee "$R/decode-pdl$pdl-$like.txt" | tail -7
      done
      rm -rf "/tmp/$like" ;;  # the W4 package stays for kprof
    kprof:*)
      like=${stage#kprof:}
      w4_model "$like" "/tmp/$like-w4"
      t "ncu: every kernel of a decode step, $like W4 batch 1"
      kec=${KPROF_EC:+--ec-density $KPROF_EC --ec-paths fused}
      ms=$(SPEAR_W4_TUNE=${KPROF_TUNE:-0} "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch 1 $kec --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["step_ms_median"])' 2>/dev/null)
      SPEAR_W4_TUNE=${KPROF_TUNE:-0} timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
        --print-units base --print-kernel-base function "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" \
        --batch 1 --steps 3 --warmup 2 $kec > "$R/kprof-$like.csv" 2> "$R/kprof-$like.err"
      python3 tools/device/kernel_breakdown.py "$R/kprof-$like.csv" $ms | tee "$R/kprof-$like.txt" ;;
    bulkab:*)
      like=${stage#bulkab:}
      t "bench decode $like W4: tuning with and without the bulk-copy kernel (SPEAR_W4_BULK)"
      w4_model "$like" "/tmp/$like-w4"
      for run in 1:1 2:0 3:1 4:0; do
        b=${run#*:}
        SPEAR_W4_BULK=$b "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch 1,8 --steps 64 \
          --out "$R/bulkab-$like-run${run%%:*}-bulk$b.json" 2>&1 | tee -a "$R/bulkab-$like.log" | grep -E "ms/step|^/tmp" | sed "s/^/bulk=$b /"
      done ;;
    ab:*)
      like=${stage#ab:}
      t "bench decode $like W4 at batch ${AB_BATCH:-1,8}, one process per setting of AB_RUNS: ${AB_RUNS:-}"
      w4_model "$like" "/tmp/$like-w4"
      i=0
      for run in ${AB_RUNS:-}; do  # NAME=VALUE[,NAME=VALUE...]
        i=$((i + 1))
        env ${run//,/ } "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch ${AB_BATCH:-1,8} --steps 64 \
          --out "$R/ab-$like-run$i.json" 2>&1 | tee -a "$R/ab-$like.log" | grep -E "ms/step" | sed "s|^|$run |"
        echo "run$i: $run" >> "$R/ab-$like.runs"
      done ;;
    ecab:*)
      like=${stage#ecab:}
      t "EC decode A/B $like, one tune + bench decode per setting of ECAB_RUNS: ${ECAB_RUNS:-}"
      w4_model "$like" "/tmp/$like-w4"
      i=0
      for run in ${ECAB_RUNS:-}; do  # NAME=VALUE[,NAME=VALUE...]
        i=$((i + 1))
        echo "run$i: $run" | tee -a "$R/ecab-$like.runs"
        env ${run//,/ } timeout 200 "$BIN/spear" tune --device cuda -m "/tmp/$like-w4" --no-latency-table --ec-density 1 \
          --ec-rank 16 --ec-gate ${EC_GATE:-8} --ec-tokens ${EC_TOKENS:-1,8} --ec-dispatch-out "$R/ecab-$like-run$i.dispatch.json" \
          > "$R/ecab-$like-run$i.tune.txt" 2>&1
        env ${run//,/ } timeout 300 "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch ${EC_BATCH:-1,8} \
          --steps 48 --ec-density ${EC_DENS:-0,0.15,0.38,0.6} --ec-paths ${EC_PATHS:-fused,auto} --ec-gate ${EC_GATE:-8} \
          --ec-dispatch "$R/ecab-$like-run$i.dispatch.json" --out "$R/ecab-$like-run$i.json" 2>&1 \
          | tee "$R/ecab-$like-run$i.txt" | grep -v "ms/step$" | tail -16 | cut -c1-20,40-200
      done ;;
    tunelog:*)
      like=${stage#tunelog:}
      t "decode plan timings $like W4 at batch ${TL_BATCH:-1}, ECs on ${TL_DENS:-0.6} of the linears (SPEAR_W4_TUNE_LOG=1)"
      w4_model "$like" "/tmp/$like-w4"
      SPEAR_W4_TUNE_LOG=1 "$BIN/spear" bench decode --device cuda -m "/tmp/$like-w4" --batch ${TL_BATCH:-1} --steps 16 \
        --ec-density 0,${TL_DENS:-0.6} --ec-paths fused > "$R/tunelog-$like.txt" 2>&1
      # per launch shape: the best register-ring plan and the bulk kernel, each at its best gate place
      awk '/^w4 tune/ {sh=$3" "$4; us=$(NF-1); k=($5=="bulk")?"bulk":"ring"; key=sh" "k;
           if (!(key in b) || us < b[key]) {b[key]=us; p[key]=$5" g"$7}} END {for (x in b) print x, p[x], b[x]}' \
        "$R/tunelog-$like.txt" | sort ;;
    e2e:*)
      like=${stage#e2e:}
      t "make-model $like"
      "$BIN/spear" make-model --like "$like" --random --out "/tmp/$like" --quantize-out "/tmp/$like-w4" 2>&1 | tail -3
      t "bench decode $like"
      "$BIN/spear" bench decode --device cuda -m "/tmp/$like" -m "/tmp/$like-w4" --batch 1,8,32 --out "$R/decode-$like.json" 2>&1 | tail -8
      rm -rf "/tmp/$like" "/tmp/$like-w4" ;;
  esac
done
t "end"
finish
