// Kernel playground (llm.c dev/cuda style, not part of the build): does weight data prefetched into L2 stay there
// and make the next reader faster on this GPU? A decode step's GEMMs stream their weights once each; prefetching
// the next GEMM's weights while the small kernels between GEMMs run (DRAM idle) only pays if the lines survive
// until the reader comes and the reader then runs at L2 speed.
//
//   cold      flush L2 (write 4 x L2), read A (evict_first loads, as the W4 kernels)
//   warm      read A twice in a row, time the second
//   pf        flush, prefetch A (prefetch.global.L2 per line, or cp.async.bulk.prefetch.L2 per CTA), read A
//   pf+B      flush, prefetch A, read B (another matrix, evict_first), read A: do A's lines survive B's stream?
//   pf||B     flush, prefetch A on a second stream while B is read, then read A
//
//   nvcc -std=c++17 -O3 -arch=sm_90a dev/cuda/l2_prefetch_lab.cu -o /tmp/l2lab && /tmp/l2lab [MB]
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#include "common.h"

__global__ void read_kernel(const uint4* p, size_t n, unsigned* out) {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p + i), "l"(pol));
    acc ^= r.x ^ r.y ^ r.z ^ r.w;
  }
  if (acc == 0x12345678u) *out = acc;
}

__global__ void prefetch_kernel(const unsigned char* p, size_t bytes, int bulk) {
  const size_t per = ((bytes + gridDim.x - 1) / gridDim.x + 127) & ~size_t(127);
  const size_t lo = blockIdx.x * per, hi = lo + per < bytes ? lo + per : bytes;
  if (lo >= hi) return;
  if (bulk) {
    if (threadIdx.x == 0)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + lo), "r"(unsigned(hi - lo)) : "memory");
  } else {
    for (size_t o = lo + threadIdx.x * 128; o < hi; o += blockDim.x * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
  }
}

int main(int argc, char** argv) {
  const size_t mb = argc > 1 ? size_t(std::atoi(argv[1])) : 16;
  const size_t bytes = mb << 20, flush_bytes = size_t(256) << 20;
  int sms = 0, l2 = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  unsigned char *A, *B, *F;
  unsigned* out;
  CK(cudaMalloc(&A, bytes));
  CK(cudaMalloc(&B, bytes));
  CK(cudaMalloc(&F, flush_bytes));
  CK(cudaMalloc(&out, 4));
  CK(cudaMemset(A, 1, bytes));
  CK(cudaMemset(B, 2, bytes));
  cudaStream_t s, s2;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  cudaEvent_t e0, e1, ef;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventCreate(&ef));
  const size_t n = bytes / 16;
  const int grid = sms * 4;
  auto rd = [&](const unsigned char* p, cudaStream_t st) {
    read_kernel<<<grid, 256, 0, st>>>(reinterpret_cast<const uint4*>(p), n, out);
  };
  auto flush = [&] { CK(cudaMemsetAsync(F, 3, flush_bytes, s)); };
  auto timed_read_a = [&] {
    CK(cudaEventRecord(e0, s));
    rd(A, s);
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1000.f;
  };
  std::printf("L2 %d MB, %d SMs, A = B = %zu MB; times of the read of A in us (GB/s), best of 5\n", l2 >> 20, sms, mb);
  const char* names[] = {"cold", "warm", "pf line", "pf bulk", "pf line+B", "pf bulk+B", "pf line||B"};
  for (int c = 0; c < 7; ++c) {
    float best = 1e9f;
    for (int r = 0; r < 5; ++r) {
      flush();
      if (c == 1) rd(A, s);
      if (c >= 2 && c != 6) prefetch_kernel<<<grid, 256, 0, s>>>(A, bytes, c == 3 || c == 5);
      if (c == 4 || c == 5) rd(B, s);
      if (c == 6) {
        CK(cudaEventRecord(ef, s));
        CK(cudaStreamWaitEvent(s2, ef));
        prefetch_kernel<<<sms, 128, 0, s2>>>(A, bytes, 0);
        rd(B, s);
        CK(cudaEventRecord(ef, s2));
        CK(cudaStreamWaitEvent(s, ef));
      }
      const float us = timed_read_a();
      if (us < best) best = us;
    }
    std::printf("%-12s %9.2f us %8.0f GB/s\n", names[c], best, bytes / (best * 1e3));
  }
  return 0;
}
