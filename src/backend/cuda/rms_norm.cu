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

}  // namespace

void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int rows, int d, float eps,
                   cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  rms_norm_kernel<kThreads><<<rows, kThreads, 0, stream>>>(x, w, out, d, eps);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
