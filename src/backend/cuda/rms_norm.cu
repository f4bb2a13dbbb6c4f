// RMSNorm and the fused residual add + RMSNorm: one block per row, fp32 statistics. When the width is a
// multiple of 8 and the rows are 16-byte aligned, each thread moves 8 bf16 per access (kVec); both kernels then
// sum x² in the same order (thread t: the 8-element groups t, t + kThreads, ...), so the fused kernel stays
// bit-identical to add_bf16 followed by rms_norm_bf16.
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rms_norm.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/row_norm.cuh"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 256;

using row_norm::add8_squares;
using row_norm::add_squares8;
using row_norm::block_sum;
using row_norm::scale_row;

template <bool kVec>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const bf16* x, const bf16* __restrict__ w, bf16* out,
                                                            int d, float eps) {
  pdl_enter();
  const size_t row = blockIdx.x;
  const bf16* xr = x + row * d;
  float ss = 0.f;
  if constexpr (kVec) {
    for (int g = threadIdx.x; g < d / 8; g += kThreads) ss = add_squares8(reinterpret_cast<const uint4*>(xr)[g], ss);
  } else {
    for (int i = threadIdx.x; i < d; i += kThreads) {
      const float v = __bfloat162float(xr[i]);
      ss += v * v;
    }
  }
  const float inv = rsqrtf(block_sum<kThreads>(ss) / float(d) + eps);
  scale_row<kVec, kThreads>(xr, w, out + row * d, d, inv);  // out may alias x: each thread rewrites only what it read
}

// x += y (fp32 add, one bf16 rounding, as add_bf16), then out = RMSNorm(x) of the rounded sum.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(bf16* __restrict__ x, const bf16* __restrict__ y,
                                                                const bf16* __restrict__ w, bf16* __restrict__ out,
                                                                int d, float eps) {
  pdl_enter();
  const size_t row = blockIdx.x;
  bf16* xr = x + row * d;
  const bf16* yr = y + row * d;
  float ss = 0.f;
  if constexpr (kVec) {
    for (int g = threadIdx.x; g < d / 8; g += kThreads) {
      uint4 a = reinterpret_cast<const uint4*>(xr)[g];
      ss = add8_squares(a, reinterpret_cast<const uint4*>(yr)[g], ss);
      reinterpret_cast<uint4*>(xr)[g] = a;
    }
  } else {
    for (int i = threadIdx.x; i < d; i += kThreads) {
      const bf16 s = __float2bfloat16_rn(__bfloat162float(xr[i]) + __bfloat162float(yr[i]));
      xr[i] = s;
      const float v = __bfloat162float(s);
      ss += v * v;
    }
  }
  const float inv = rsqrtf(block_sum<kThreads>(ss) / float(d) + eps);
  scale_row<kVec, kThreads>(xr, w, out + row * d, d, inv);  // each thread reads back only the elements it wrote
}

bool vec_ok(int d, const void* a, const void* b, const void* c, const void* e) {
  auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return d % 8 == 0 && al(a) && al(b) && al(c) && al(e);
}

}  // namespace

void add_rms_norm_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, const __nv_bfloat16* w, __nv_bfloat16* out,
                       int rows, int d, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  if (vec_ok(d, x, y, w, out))
    launch_kernel(add_rms_norm_kernel<true>, rows, kThreads, 0, stream, x, y, w, out, d, eps);
  else
    launch_kernel(add_rms_norm_kernel<false>, rows, kThreads, 0, stream, x, y, w, out, d, eps);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int rows, int d, float eps,
                   cudaStream_t stream) {
  if (rows == 0) return;
  if (vec_ok(d, x, x, w, out))
    launch_kernel(rms_norm_kernel<true>, rows, kThreads, 0, stream, x, w, out, d, eps);
  else
    launch_kernel(rms_norm_kernel<false>, rows, kThreads, 0, stream, x, w, out, d, eps);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
