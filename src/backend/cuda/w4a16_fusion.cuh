// The decode-step fusions of the W4 decode kernels (w4a16_gemm.h: W4Fusion): the element-wise step before a GEMM
// applied while its CTAs stage x, the residual add after it in the epilogue. Each piece repeats the arithmetic of
// the kernel it replaces (rms_norm.cu, elementwise.cu's swiglu and add) operation for operation, so that a fused
// decode step is bit-identical to the op-by-op one. Internal to the CUDA backend.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace spear::cuda {

// silu(g) · u in fp32 (g / (1 + e^-g): -inf-safe, as the CPU reference). The SwiGLU kernel and the fused x staging
// both use this one definition.
__device__ __forceinline__ float swiglu_f(float g, float u) { return g / (1.f + expf(-g)) * u; }

namespace w4_detail {

// The fusion of one launch as the kernels see it (norm_w and up are never both set).
struct W4XformDev {
  const __nv_bfloat16* norm_w;  // x := rms_norm(x) · norm_w
  const __nv_bfloat16* up;      // x := silu(x) ⊙ up
  float eps;
  int residual;  // y := y + result
  __device__ __forceinline__ bool transforms_x() const { return norm_w || up; }
};

// inv[r] = 1 / rms(x row r) for r < m <= 8, over all k (k % 8 == 0, rows 16-byte aligned), in rms_norm.cu's order:
// thread t of the 256 sums the squares of the 8-element groups t, t + 256, ...; each warp's sums are added by a
// butterfly; the 8 warp sums (and 24 zeros) by another. scratch: 64 floats of shared memory. Every one of the 256
// threads calls it; sync() is a barrier over exactly them.
template <class Sync>
__device__ __forceinline__ void row_inv_rms(const __nv_bfloat16* x, int m, int k, float eps, float* scratch,
                                            float* inv, int tid, Sync sync) {
  const int warp = tid >> 5, lane = tid & 31;
  for (int r = 0; r < m; ++r) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + size_t(r) * k);
    float ss = 0.f;
    for (int g = tid; g < k / 8; g += 256) {
      const uint4 v = xr[g];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(h[j]);
        ss += f.x * f.x;
        ss += f.y * f.y;
      }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) scratch[r * 8 + warp] = ss;
  }
  sync();
  if (warp < m) {
    float t = lane < 8 ? scratch[warp * 8 + lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) inv[warp] = rsqrtf(t / float(k) + eps);
  }
  sync();
}

// Stages x rows [0, m), columns [col0, col0 + 8 · segs) into xs (rows xs_stride apart) through the fusion's
// transform, zero beyond k; inv: row_inv_rms's result (norm). k % 8 == 0 and every row 16-byte aligned.
__device__ __forceinline__ void stage_x_transformed(__nv_bfloat16* xs, int xs_stride, const __nv_bfloat16* x, int m,
                                                    int k, int col0, int segs, const W4XformDev& f,
                                                    const float* inv, int tid, int nthreads) {
  for (int i = tid; i < m * segs; i += nthreads) {
    const int r = i / segs, cs = i - r * segs, col = col0 + cs * 8;
    uint4 o = make_uint4(0u, 0u, 0u, 0u);
    if (col < k) {
      const uint4 xv = *reinterpret_cast<const uint4*>(x + size_t(r) * k + col);
      const uint4 pv = f.norm_w ? *reinterpret_cast<const uint4*>(f.norm_w + col)
                                : *reinterpret_cast<const uint4*>(f.up + size_t(r) * k + col);
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
      const __nv_bfloat162* ph = reinterpret_cast<const __nv_bfloat162*>(&pv);
      __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
      const float s = f.norm_w ? inv[r] : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(ph[j]);
        oh[j] = f.norm_w ? __floats2bfloat162_rn(b.x * (a.x * s), b.y * (a.y * s))  // row_norm::scale_row
                         : __floats2bfloat162_rn(swiglu_f(a.x, b.x), swiglu_f(a.y, b.y));
      }
    }
    *reinterpret_cast<uint4*>(xs + r * xs_stride + cs * 8) = o;
  }
}

// The epilogue's store of one output element: the GEMM's bf16 result, or with the residual fusion the bf16 sum of
// the residual stream and that result (add_bf16's one fp32 add and rounding).
__device__ __forceinline__ void store_output(__nv_bfloat16* y, __nv_bfloat16 v, int residual) {
  *y = residual ? __float2bfloat16_rn(__bfloat162float(*y) + __bfloat162float(v)) : v;
}

}  // namespace w4_detail
}  // namespace spear::cuda
