// The decode-step fusions of the W4 decode kernels (w4a16_gemm.h: W4Fusion): the residual add in the epilogue, and
// the element-wise step after a GEMM done by the CTA that finishes last (the RMSNorm of the next linear's input) or
// by the second CTA of a gate / up tile pair (SwiGLU). Each piece repeats the arithmetic of the kernel it replaces
// (rms_norm.cu, elementwise.cu's swiglu and add) operation for operation, so a fused decode step is bit-identical to
// the op-by-op one. Values other CTAs wrote in this launch are read with ld.global.cg (L2, never a stale L1 line).
// Internal to the CUDA backend.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

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
  int residual;                  // y[i] := y[i] + the product
  const __nv_bfloat16* norm_w;   // then norm_out = rms_norm(y[0]) · norm_w (count 1, by the last CTA)
  __nv_bfloat16* norm_out;
  float eps;
  __nv_bfloat16* swiglu_out;     // count 2: swiglu_out = silu(y[0]) ⊙ y[1] (may alias y[0])
  unsigned* counters;            // kFusedCounterBytes, zero between launches
  __device__ __forceinline__ bool tails() const { return norm_out || swiglu_out; }
};

// The epilogue's store of one output element: the GEMM's bf16 result, or with the residual fusion the bf16 sum of
// the residual stream and that result (add_bf16's one fp32 add and rounding).
__device__ __forceinline__ void store_output(__nv_bfloat16* y, __nv_bfloat16 v, int residual) {
  *y = residual ? __float2bfloat16_rn(__bfloat162float(*y) + __bfloat162float(v)) : v;
}

// SwiGLU tail, called by the whole warp that stored tile `tile` of matrix mi (0: gate, 1: up) for every token, right
// after its stores: the second of the pair's two warps to arrive computes swiglu_out for the tile's 16 rows.
__device__ __forceinline__ void swiglu_pair_tail(const W4FuseDev& f, const __nv_bfloat16* gate,
                                                 const __nv_bfloat16* up, int n, int m, int tile, int lane) {
  __threadfence();  // this lane's stores, before the arrival
  __syncwarp();
  unsigned prev = 0;
  if (lane == 0) prev = atomicAdd(f.counters + 1 + tile, 1u);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev == 0) return;  // the partner tile is not stored yet: its warp finishes the pair
  __threadfence();
  for (int e = lane; e < 16 * m; e += 32) {
    const int tok = e >> 4, row = tile * 16 + (e & 15);
    if (row >= n) continue;
    const size_t i = size_t(tok) * n + row;
    const float g = __bfloat162float(__ldcg(gate + i)), u = __bfloat162float(__ldcg(up + i));
    f.swiglu_out[i] = __float2bfloat16_rn(swiglu_f(g, u));
  }
  if (lane == 0) f.counters[1 + tile] = 0;  // both halves have arrived: ready for the next launch
}

// 1 / rms(x row r) for r < m <= 8, over all n (n % 8 == 0, rows 16-byte aligned), in rms_norm.cu's order: thread t
// of the 256 sums the squares of the 8-element groups t, t + 256, ...; each warp's sums are added by a butterfly;
// the 8 warp sums (and 24 zeros) by another. scratch: 72 floats of shared memory (inv[r] = scratch[64 + r]).
template <class Sync>
__device__ __forceinline__ void row_inv_rms(const __nv_bfloat16* x, int m, int n, float eps, float* scratch, int tid,
                                            Sync sync) {
  const int warp = tid >> 5, lane = tid & 31;
  for (int r = 0; r < m; ++r) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + size_t(r) * n);
    float ss = 0.f;
    for (int g = tid; g < n / 8; g += 256) {
      const uint4 v = __ldcg(xr + g);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 fv = __bfloat1622float2(h[j]);
        ss += fv.x * fv.x;
        ss += fv.y * fv.y;
      }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) scratch[r * 8 + warp] = ss;
  }
  sync();
  if (warp < m) {
    float t = lane < 8 ? scratch[warp * 8 + lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) scratch[64 + warp] = rsqrtf(t / float(n) + eps);
  }
  sync();
}

// Norm tail, called by all 256 threads of every CTA at the very end of the launch (after its stores; sync() is a
// barrier over exactly them): the CTA that arrives last writes norm_out = rms_norm(y) · norm_w for the m rows of y
// [m][n] (rms_norm.cu's arithmetic) and puts the counter back to zero. flag: one int of shared memory.
template <class Sync>
__device__ __forceinline__ void norm_tail(const W4FuseDev& f, const __nv_bfloat16* y, int m, int n, unsigned ctas,
                                          float* scratch, int* flag, int tid, Sync sync) {
  __threadfence();  // this thread's stores, before the CTA's arrival
  sync();
  if (tid == 0) *flag = atomicAdd(f.counters, 1u) == ctas - 1;
  sync();
  if (!*flag) return;
  __threadfence();
  row_inv_rms(y, m, n, f.eps, scratch, tid, sync);
  for (int r = 0; r < m; ++r) {
    const float inv = scratch[64 + r];
    const uint4* xr = reinterpret_cast<const uint4*>(y + size_t(r) * n);
    uint4* orow = reinterpret_cast<uint4*>(f.norm_out + size_t(r) * n);
    for (int g = tid; g < n / 8; g += 256) {  // row_norm::scale_row
      const uint4 xv = __ldcg(xr + g), wv = reinterpret_cast<const uint4*>(f.norm_w)[g];
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
      const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv);
      uint4 o;
      __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(wh[j]);
        oh[j] = __floats2bfloat162_rn(b.x * (a.x * inv), b.y * (a.y * inv));
      }
      orow[g] = o;
    }
  }
  if (tid == 0) *f.counters = 0;
}

}  // namespace w4_detail
}  // namespace spear::cuda
