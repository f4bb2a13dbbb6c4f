// The decode-step fusions of the W4 decode kernels (w4a16_gemm.h: W4Fusion): the residual add in the epilogue, and
// the element-wise step after a GEMM done by the CTA that finishes last (the RMSNorm of the next linear's input) or
// by the second CTA of a gate / up tile pair (SwiGLU). Each piece repeats the arithmetic of the kernel it replaces
// (rms_norm.cu, elementwise.cu's swiglu and add) operation for operation, so a fused decode step is bit-identical to
// the op-by-op one. Values other CTAs wrote in this launch are read with ld.global.cg (L2, never a stale L1 line).
// Internal to the CUDA backend.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/row_norm.cuh"

namespace spear::cuda {

// silu(g) · u in fp32 (g / (1 + e^-g): -inf-safe, as the CPU reference). The SwiGLU kernel and the fused tail both
// use this one definition.
__device__ __forceinline__ float swiglu_f(float g, float u) { return g / (1.f + expf(-g)) * u; }

namespace w4_detail {

constexpr int kFusedMaxTokens = 8;        // one token tile: each 16-row tile is stored by one warp
constexpr int kFusedMaxPairTiles = 4096;  // SwiGLU tail: gate / up matrices of up to 65536 rows
// counters[0]: CTAs of the launch done (norm tail); counters[1 + i]: halves of tile pair i done (SwiGLU tail).
constexpr size_t kFusedCounterBytes = size_t(1 + kFusedMaxPairTiles) * sizeof(unsigned);

// The fusions of one launch as the kernels see them (zero: none).
struct W4FuseDev {
  int residual;                 // y[i] := y[i] + the product
  const __nv_bfloat16* norm_w;  // then norm_out = rms_norm(y[0]) · norm_w (count 1, by the last CTA)
  __nv_bfloat16* norm_out;
  float eps;
  __nv_bfloat16* swiglu_out;  // count 2: swiglu_out = silu(y[0]) ⊙ y[1] (may alias y[0])
  unsigned* counters;         // kFusedCounterBytes, zero between launches
  __device__ __forceinline__ bool tails() const { return norm_out || swiglu_out; }
};

// The epilogue's store of one output element: the GEMM's bf16 result, or with the residual fusion the bf16 sum of
// the residual stream and that result (add_bf16's one fp32 add and rounding).
__device__ __forceinline__ void store_output(__nv_bfloat16* y, __nv_bfloat16 v, int residual) {
  *y = residual ? __float2bfloat16_rn(__bfloat162float(*y) + __bfloat162float(v)) : v;
}

// SwiGLU tail, called by the whole warp that stored tile `tile` of matrix mi (0: gate, 1: up) for every token, right
// after its stores: the second of the pair's two warps to arrive computes swiglu_out for the tile's 16 rows.
__device__ __forceinline__ void swiglu_pair_tail(const W4FuseDev& f, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                                 int n, int m, int tile, int lane) {
  __threadfence();  // this lane's stores, before the arrival
  __syncwarp();
  unsigned prev = 0;
  if (lane == 0) prev = atomicAdd(f.counters + 1 + tile, 1u);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev == 0) return;  // the partner tile is not stored yet: its warp finishes the pair
  __threadfence();
  // All loads first (16 · m <= 128 elements: at most 4 per lane), so the 8 reads of a lane are in flight together.
  constexpr int kPer = 16 * kFusedMaxTokens / 32;
  float g[kPer], u[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int e = lane + 32 * j, tok = e >> 4, row = tile * 16 + (e & 15);
    const bool ok = tok < m && row < n;
    const size_t i = size_t(ok ? tok : 0) * n + (ok ? row : 0);
    g[j] = ok ? __bfloat162float(__ldcg(gate + i)) : 0.f;
    u[j] = ok ? __bfloat162float(__ldcg(up + i)) : 0.f;
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int e = lane + 32 * j, tok = e >> 4, row = tile * 16 + (e & 15);
    if (tok < m && row < n) f.swiglu_out[size_t(tok) * n + row] = __float2bfloat16_rn(swiglu_f(g[j], u[j]));
  }
  if (lane == 0) f.counters[1 + tile] = 0;  // both halves have arrived: ready for the next launch
}

// Norm tail, called by all 256 threads of every CTA at the very end of the launch (after its stores; sync() is a
// barrier over exactly them): the CTA that arrives last writes norm_out = rms_norm(y) · norm_w for the m rows of y
// [m][n] (n % 8 == 0, rows 16-byte aligned) in rms_norm.cu's order: thread t of the 256 sums the squares of the
// 8-element groups t, t + 256, ... of a row; each warp's sums are added by a butterfly, the 8 warp sums (and 24
// zeros) by another; then out = w · (x · inv) (row_norm::add_squares8, scale8: rms_norm.cu's own pieces). Rows go
// kTailRows at a time with all their loads in flight together and kept in registers for the scaling (one L2 round trip
// per chunk, not two per row); widths beyond kTailGroups · 2048 take a slower loop. Puts the counter back to zero.
// scratch: 40 floats, flag: one int.
constexpr int kTailRows = 4, kTailGroups = 3;
template <class Sync>
__device__ __forceinline__ void norm_tail(const W4FuseDev& f, const __nv_bfloat16* y, int m, int n, unsigned ctas,
                                          float* scratch, int* flag, int tid, Sync sync) {
  __threadfence();  // this thread's stores, before the CTA's arrival
  sync();
  if (tid == 0) *flag = atomicAdd(f.counters, 1u) == ctas - 1;
  sync();
  if (!*flag) return;
  __threadfence();
  const int warp = tid >> 5, lane = tid & 31, groups = n / 8;
  const uint4* w = reinterpret_cast<const uint4*>(f.norm_w);
  // The warp sums of rows r0.. (scratch[rr * 8 + warp]), then 1 / rms by warp rr (scratch[32 + rr]).
  auto finish_rows = [&](const float(&ss)[kTailRows], int r0) {
#pragma unroll
    for (int rr = 0; rr < kTailRows; ++rr) {
      float v = ss[rr];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) scratch[rr * 8 + warp] = v;
    }
    sync();
    if (warp < kTailRows && r0 + warp < m) {
      float t = lane < 8 ? scratch[warp * 8 + lane] : 0.f;
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0) scratch[32 + warp] = rsqrtf(t / float(n) + f.eps);
    }
    sync();
  };
  for (int r0 = 0; r0 < m; r0 += kTailRows) {
    float ss[kTailRows];
    if (groups <= 256 * kTailGroups) {
      uint4 v[kTailRows][kTailGroups];
#pragma unroll
      for (int rr = 0; rr < kTailRows; ++rr)
#pragma unroll
        for (int j = 0; j < kTailGroups; ++j) {
          const int g = tid + 256 * j;
          v[rr][j] = r0 + rr < m && g < groups ? __ldcg(reinterpret_cast<const uint4*>(y + size_t(r0 + rr) * n) + g)
                                               : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
      for (int rr = 0; rr < kTailRows; ++rr) {
        ss[rr] = 0.f;
#pragma unroll
        for (int j = 0; j < kTailGroups; ++j)
          if (tid + 256 * j < groups) ss[rr] = row_norm::add_squares8(v[rr][j], ss[rr]);
      }
      finish_rows(ss, r0);
#pragma unroll
      for (int rr = 0; rr < kTailRows; ++rr) {
        if (r0 + rr >= m) break;
        const float inv = scratch[32 + rr];
        uint4* orow = reinterpret_cast<uint4*>(f.norm_out + size_t(r0 + rr) * n);
#pragma unroll
        for (int j = 0; j < kTailGroups; ++j) {
          const int g = tid + 256 * j;
          if (g < groups) orow[g] = row_norm::scale8(v[rr][j], w[g], inv);
        }
      }
    } else {  // wide rows: the same order, loaded twice
#pragma unroll
      for (int rr = 0; rr < kTailRows; ++rr) {
        ss[rr] = 0.f;
        if (r0 + rr < m)
          for (int g = tid; g < groups; g += 256)
            ss[rr] =
                row_norm::add_squares8(__ldcg(reinterpret_cast<const uint4*>(y + size_t(r0 + rr) * n) + g), ss[rr]);
      }
      finish_rows(ss, r0);
      for (int rr = 0; rr < kTailRows && r0 + rr < m; ++rr) {
        const float inv = scratch[32 + rr];
        const uint4* xr = reinterpret_cast<const uint4*>(y + size_t(r0 + rr) * n);
        uint4* orow = reinterpret_cast<uint4*>(f.norm_out + size_t(r0 + rr) * n);
        for (int g = tid; g < groups; g += 256) orow[g] = row_norm::scale8(__ldcg(xr + g), w[g], inv);
      }
    }
    sync();  // scratch is reused by the next chunk
  }
  if (tid == 0) *f.counters = 0;
}

}  // namespace w4_detail
}  // namespace spear::cuda
