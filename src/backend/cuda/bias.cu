#include "backend/cuda/bias.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"

namespace spear::cuda {

namespace {

template <typename T>
__global__ void add_bias_kernel(T* y, const __nv_bfloat16* __restrict__ bias, int rows, int n) {
  pdl_enter();
  const size_t total = size_t(rows) * n;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const float b = __bfloat162float(bias[i % n]);
    if constexpr (sizeof(T) == 4)
      y[i] = y[i] + b;
    else
      y[i] = __float2bfloat16(__bfloat162float(y[i]) + b);
  }
}

int blocks_for(size_t total) { return int(std::min<size_t>((total + 255) / 256, 4096)); }

}  // namespace

void add_bias_bf16(__nv_bfloat16* y, const __nv_bfloat16* bias, int rows, int n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  launch_kernel(add_bias_kernel<__nv_bfloat16>, blocks_for(size_t(rows) * n), 256, 0, stream, y, bias, rows, n);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void add_bias_f32(float* y, const __nv_bfloat16* bias, int rows, int n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  launch_kernel(add_bias_kernel<float>, blocks_for(size_t(rows) * n), 256, 0, stream, y, bias, rows, n);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
