#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rms_norm.h"

namespace spear::cuda {

namespace {

// One block per row; each thread accumulates a strided slice of x², then a block reduction.
template <int kThreads>
__global__ void rms_norm_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                __nv_bfloat16* out, int d, float eps) {
  const size_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    float v = __bfloat162float(xr[i]);
    ss += v * v;
  }
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) warp_sums[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(warp_sums[0] / float(d) + eps);
  __nv_bfloat16* orow = out + row * d;
  for (int i = threadIdx.x; i < d; i += kThreads)
    orow[i] = __float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(xr[i]) * inv));
}

// x += y (fp32 add, one bf16 rounding, as add_bf16), then out = RMSNorm(x) of the rounded sum (as rms_norm_bf16):
// the residual add and the next norm of a decoder layer in one pass over the row, bit-identical to the two.
template <int kThreads>
__global__ void add_rms_norm_kernel(__nv_bfloat16* x, const __nv_bfloat16* __restrict__ y,
                                    const __nv_bfloat16* __restrict__ w, __nv_bfloat16* out, int d, float eps) {
  const size_t row = blockIdx.x;
  __nv_bfloat16* xr = x + row * d;
  const __nv_bfloat16* yr = y + row * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const __nv_bfloat16 s = __float2bfloat16_rn(__bfloat162float(xr[i]) + __bfloat162float(yr[i]));
    xr[i] = s;
    const float v = __bfloat162float(s);
    ss += v * v;
  }
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) warp_sums[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(warp_sums[0] / float(d) + eps);
  __nv_bfloat16* orow = out + row * d;
  for (int i = threadIdx.x; i < d; i += kThreads)  // each thread reads back only the elements it wrote
    orow[i] = __float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(xr[i]) * inv));
}

}  // namespace

void add_rms_norm_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, const __nv_bfloat16* w, __nv_bfloat16* out,
                       int rows, int d, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  add_rms_norm_kernel<kThreads><<<rows, kThreads, 0, stream>>>(x, y, w, out, d, eps);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int rows, int d, float eps,
                   cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  rms_norm_kernel<kThreads><<<rows, kThreads, 0, stream>>>(x, w, out, d, eps);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
