#!/usr/bin/env bash
# Copies the device binaries of BUILD_DIR (default build-dev: portable, CUDA on, plots off) stripped into
# .devrun/bin, with the shared libraries they need that a bare CUDA image lacks, into .devrun/lib.
# STAGE_BINS (default all four) names the binaries to send when the tree plus the bundle would pass 64 MiB.
set -eu
B=${1:-build-dev}
rm -rf .devrun/bin
mkdir -p .devrun/bin .devrun/lib
for f in spear tests/backend/test_cuda_ops bench/bench_w4_gemm bench/bench_allreduce; do
  [[ " ${STAGE_BINS:-spear test_cuda_ops bench_w4_gemm bench_allreduce} " == *" $(basename $f) "* ]] || continue
  [[ -f "$B/$f" ]] && strip -o ".devrun/bin/$(basename $f)" "$B/$f"
done
for lib in $(ldd .devrun/bin/* | awk '/=>/ {print $3}' | sort -u); do
  case $(basename "$lib") in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s*|libstdc++*|libcuda*|libcublas*|libnvidia*) ;;
    *) cp -L "$lib" .devrun/lib/ ;;
  esac
done
du -sh .devrun/bin .devrun/lib
# The working tree already takes most of the 64 MiB a device call carries: send one xz bundle.
mkdir -p .devrun/carry
# The evaluation text the device stages read (the device machine has no ../shared).
mkdir -p .devrun/data
[[ -f .devrun/data/test.txt ]] || cp ../shared/data/test.txt .devrun/data/
# A SPEAR package of the reference model without its quantized weights (made here once by `spear calibrate
# --preset fast`, about 2 minutes on 2 cores; its weights are the deterministic RTN ones that `spear quantize`
# rebuilds on the device).
if [[ ! -d .devrun/ref-spear && -x "$B/spear" ]]; then
  "$B/spear" calibrate --model models/ref-llama-23m --out .devrun/ref-spear --method rtn --bits 4 --budget 0.01 \
    --preset fast > .devrun/calibrate.log 2>&1 && rm -f .devrun/ref-spear/model.safetensors
fi
extra=$([[ -d .devrun/ref-spear ]] && echo ref-spear)
XZ_OPT=-9 tar cJf .devrun/carry/bundle.tar.xz -C .devrun bin lib data/test.txt $extra
du -sh .devrun/carry
