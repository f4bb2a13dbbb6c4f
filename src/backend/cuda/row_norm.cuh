// The per-row RMSNorm pieces shared by rms_norm.cu and the fused tensor-parallel tail (tp_tail.cu), one block of
// kThreads per row: both must sum and scale in the same order to stay bit-identical to each other. Internal to the
// CUDA backend.
#pragma once

#include <cuda_bf16.h>

namespace spear::cuda::row_norm {

// Block-wide sum of every thread's `v`.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) warp_sums[0] = t;
  }
  __syncthreads();
  return warp_sums[0];
}

// ss + the squares of the 8 bf16 of v, in element order: every RMSNorm's per-thread sum (rms_norm.cu, the fused
// W4 norm tail) goes through this one definition, so they stay bit-identical.
__device__ __forceinline__ float add_squares8(const uint4& v, float ss) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    ss += f.x * f.x;
    ss += f.y * f.y;
  }
  return ss;
}

// a := bf16(a + b) for 8 bf16 (fp32 add, one rounding, as add_bf16), then ss + the squares of the rounded sums in
// element order: the residual add + RMSNorm's per-thread step (rms_norm.cu, the deferred EC's norm launch).
__device__ __forceinline__ float add8_squares(uint4& a, const uint4& b, float ss) {
  __nv_bfloat162* ah = reinterpret_cast<__nv_bfloat162*>(&a);
  const __nv_bfloat162* bh = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 fa = __bfloat1622float2(ah[j]), fb = __bfloat1622float2(bh[j]);
    ah[j] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
    const float2 f = __bfloat1622float2(ah[j]);
    ss += f.x * f.x;
    ss += f.y * f.y;
  }
  return ss;
}

// w · (x · inv) of 8 bf16, each rounded once.
__device__ __forceinline__ uint4 scale8(const uint4& xv, const uint4& wv, float inv) {
  const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
  const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv);
  uint4 o;
  __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(wh[j]);
    oh[j] = __floats2bfloat162_rn(b.x * (a.x * inv), b.y * (a.y * inv));
  }
  return o;
}

// out[i] = w[i] · (x[i] · inv) for the row (x already final). kVec: 8 bf16 per access (d % 8 == 0, rows 16-byte
// aligned); each thread reads back only the elements it wrote, so orow may alias xr (no __restrict__ on them).
template <bool kVec, int kThreads>
__device__ __forceinline__ void scale_row(const __nv_bfloat16* xr, const __nv_bfloat16* __restrict__ w,
                                          __nv_bfloat16* orow, int d, float inv) {
  if constexpr (kVec) {
    for (int g = threadIdx.x; g < d / 8; g += kThreads)
      reinterpret_cast<uint4*>(orow)[g] =
          scale8(reinterpret_cast<const uint4*>(xr)[g], reinterpret_cast<const uint4*>(w)[g], inv);
  } else {
    for (int i = threadIdx.x; i < d; i += kThreads)
      orow[i] = __float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(xr[i]) * inv));
  }
}

}  // namespace spear::cuda::row_norm
