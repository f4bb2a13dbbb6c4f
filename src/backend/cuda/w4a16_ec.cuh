// Device side of the error compensator fused into the W4A16 decode kernel (w4a16_gemm.h describes the scheme;
// w4a16_decode.cu calls these). Internal to the CUDA backend.
//
// Scratch of one EC (w4a16_ec_scratch_bytes): 4 counters (ticket and done: used by the launch's first EC
// only; arrivals of k-slices; ready flag), then g ⊙ z [32][rank] fp32, then the k-slice partial sums
// [kEcMaxSlices][32][rank] fp32. Everything is written before it is read within one launch, and the counters
// are back at zero when the launch ends, so the same scratch serves every launch of its linear.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "backend/cuda/w4a16_common.cuh"

namespace spear::cuda::w4_detail {

constexpr int kEcMaxSlices = 16;
constexpr int kEcCounterBytes = 16;

__host__ __device__ constexpr size_t ec_scratch_bytes(int rank) {
  return size_t(kEcCounterBytes) + size_t(4) * 32 * rank * (1 + kEcMaxSlices);
}

// One fused EC as the kernel sees it (inside W4DecodeParams, by value).
struct W4DecEc {
  const __nv_bfloat16* A;  // [rank][k]
  const __nv_bfloat16* B;  // [n][rank]
  const float *W1, *b1, *W2, *b2;
  unsigned* counters;  // ticket, done, arrivals, flag
  float* zg;           // [32][rank]
  float* zpart;        // [kEcMaxSlices][32][rank]
  int rank, gate_width, slices, kc, ticket0;
};

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(pa[i]), fb = __bfloat1622float2(pb[i]);
    s = fmaf(fa.x, fb.x, s);
    s = fmaf(fa.y, fb.y, s);
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// k-slice `s` of z = A·x for tokens [0, m) into e.zpart[s] (the whole CTA; x read through L2: the previous
// kernel wrote it). Then the CTA that completes the EC's last slice reduces the slices in order, applies the
// gate (one warp per token, 128 floats of `wbuf` per warp) and releases g ⊙ z. Ends with __syncthreads.
static __device__ __noinline__ void ec_z_slice(const W4DecEc& e, int s, const __nv_bfloat16* x, int m, int k, float* wbuf) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = e.rank, k0 = s * e.kc, k1 = min(k, k0 + e.kc);
  for (int j = warp; j < r; j += kWarps) {
    const __nv_bfloat16* arow = e.A + size_t(j) * k;
    for (int t0 = 0; t0 < m; t0 += 4) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int kk = k0 + lane * 8; kk < k1; kk += 256) {
        const uint4 a = __ldg(reinterpret_cast<const uint4*>(arow + kk));
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (t0 + c < m) acc[c] += dot8_bf16(a, __ldcg(reinterpret_cast<const uint4*>(x + size_t(t0 + c) * k + kk)));
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float v = warp_sum(acc[c]);
        if (lane == 0 && t0 + c < m) __stcg(e.zpart + (size_t(s) * 32 + t0 + c) * r + j, v);
      }
    }
  }
  __shared__ int s_last;
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s_last = atomicAdd(e.counters + 2, 1u) == unsigned(e.slices - 1);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  float* zb = wbuf + warp * 128;  // z [rank], then h [gate_width]
  float* hb = zb + 64;
  for (int t = warp; t < m; t += kWarps) {
    for (int j = lane; j < r; j += 32) {
      float z = 0.f;
      for (int q = 0; q < e.slices; ++q) z += __ldcg(e.zpart + (size_t(q) * 32 + t) * r + j);
      zb[j] = z;
    }
    __syncwarp();
    const int gw = e.gate_width;
    if (gw > 0) {
      for (int i = lane; i < gw; i += 32) {
        float a = e.b1[i];
        for (int j = 0; j < r; ++j) a = fmaf(e.W1[i * r + j], zb[j], a);
        hb[i] = a / (1.f + expf(-a));
      }
      __syncwarp();
    }
    for (int j = lane; j < r; j += 32) {
      float zg = zb[j];
      if (gw > 0) {
        float u = e.b2[j];
        for (int i = 0; i < gw; ++i) u = fmaf(e.W2[j * gw + i], hb[i], u);
        zg *= 1.f + tanhf(u);
      }
      __stcg(e.zg + size_t(t) * r + j, zg);
    }
    __syncwarp();
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    st_release_gpu(e.counters + 3, 1u);
  }
}

// Waits (thread 0) until g ⊙ z of `e` is published, then copies it for tokens [0, m) into shared memory
// zs [m][rank]. Every thread of the CTA calls it; ends with __syncthreads.
__device__ __forceinline__ void ec_fetch_zg(const W4DecEc& e, int m, float* zs) {
  if (threadIdx.x == 0)
    while (ld_acquire_gpu(e.counters + 3) == 0) __nanosleep(64);
  __syncthreads();
  for (int i = threadIdx.x; i < m * e.rank; i += kThreads) zs[i] = __ldcg(e.zg + i);
  __syncthreads();
}

// Σ_j B[row][j] · (g ⊙ z)[tok][j] from shared memory (bs: this row's B, zs: this token's g ⊙ z).
__device__ __forceinline__ float ec_term(const __nv_bfloat16* bs, const float* zs, int r) {
  float s = 0.f;
  for (int j = 0; j < r; j += 2) {
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bs + j));
    s = fmaf(b.x, zs[j], s);
    s = fmaf(b.y, zs[j + 1], s);
  }
  return s;
}

}  // namespace spear::cuda::w4_detail
