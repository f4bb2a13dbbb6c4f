#!/usr/bin/env bash
# Copies the device binaries of BUILD_DIR (default build-dev: portable, CUDA on, plots off) stripped into
# .devrun/bin, with the shared libraries they need that a bare CUDA image lacks, into .devrun/lib.
set -eu
B=${1:-build-dev}
mkdir -p .devrun/bin .devrun/lib
for f in spear tests/backend/test_cuda_ops bench/bench_w4_gemm bench/bench_allreduce; do
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
# A SPEAR package of the reference model without its quantized weights (made here by `spear calibrate
# --preset fast`; they are the deterministic RTN weights that `spear quantize` rebuilds on the device).
extra=$([[ -d .devrun/ref-spear ]] && echo ref-spear)
tar cJf .devrun/carry/bundle.tar.xz -C .devrun bin lib data/test.txt $extra
du -sh .devrun/carry
