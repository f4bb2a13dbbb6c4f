// Rotate-half RoPE arithmetic shared by every kernel that rotates (rope_bf16, rope_kv_append_bf16 and the decode
// attention with RoPE fused in), so that they give the same bits: the angle is the fp32 product position ·
// inv_freq (as HF), and the products and the sum are rounded one by one (no contraction into an FMA, which the
// compiler may or may not do differently in each kernel).
#pragma once

#include <cuda_bf16.h>

namespace spear::cuda {

// cos / sin of one pair's angle at position pos.
__device__ __forceinline__ void rope_angle(float pos, float inv_freq, float& c, float& s) {
  sincosf(pos * inv_freq, &s, &c);
}

// cos / sin of every pair i < half at position pos: cs[i], sn[i]; threads tid, tid + stride, ... take a share.
__device__ __forceinline__ void rope_angles(float pos, const float* __restrict__ inv_freq, int half, float* cs,
                                            float* sn, int tid, int stride) {
  for (int i = tid; i < half; i += stride) rope_angle(pos, inv_freq[i], cs[i], sn[i]);
}

// (a, b) = (x[i], x[i + half]) -> (a·c - b·s, b·c + a·s), each rounded to bf16.
__device__ __forceinline__ void rope_rotate(float a, float b, float c, float s, __nv_bfloat16& lo,
                                            __nv_bfloat16& hi) {
  lo = __float2bfloat16_rn(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
  hi = __float2bfloat16_rn(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
}

// Two adjacent pairs (i, i + 1) through bf16x2 words: a = (x[i], x[i + 1]), b = (x[i + half], x[i + half + 1]).
__device__ __forceinline__ void rope_rotate2(__nv_bfloat162 a, __nv_bfloat162 b, float c0, float c1, float s0,
                                             float s1, __nv_bfloat162& lo, __nv_bfloat162& hi) {
  const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
  rope_rotate(fa.x, fb.x, c0, s0, lo.x, hi.x);
  rope_rotate(fa.y, fb.y, c1, s1, lo.y, hi.y);
}

}  // namespace spear::cuda
