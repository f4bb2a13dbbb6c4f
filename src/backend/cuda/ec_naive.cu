#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_naive.h"
#include "backend/cuda/pdl.cuh"

namespace spear::cuda {

namespace {

constexpr int kThreads = 256;
int blocks_for(long long n) { return int((n + kThreads - 1) / kThreads < 65535 ? (n + kThreads - 1) / kThreads : 65535); }

__global__ void bias_silu_kernel(float* h, const float* __restrict__ b1, long long n, int w) {
  pdl_enter();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float v = h[i] + b1[i % w];
    h[i] = v / (1.f + expf(-v));
  }
}

__global__ void gate_kernel(const float* u, const float* __restrict__ b2, const float* __restrict__ z, float* zg,
                            long long n, int r) {
  pdl_enter();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    zg[i] = (1.f + tanhf(u[i] + b2[i % r])) * z[i];
}

__global__ void add_into_bf16_kernel(__nv_bfloat16* y, const float* __restrict__ d, long long n) {
  pdl_enter();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(__bfloat162float(y[i]) + d[i]);
}

}  // namespace

void ec_bias_silu_f32(float* h, const float* b1, int T, int w, cudaStream_t stream) {
  const long long n = (long long)T * w;
  if (n == 0) return;
  launch_kernel(bias_silu_kernel, blocks_for(n), kThreads, 0, stream, h, b1, n, w);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void ec_gate_f32(const float* u, const float* b2, const float* z, float* zg, int T, int r, cudaStream_t stream) {
  const long long n = (long long)T * r;
  if (n == 0) return;
  launch_kernel(gate_kernel, blocks_for(n), kThreads, 0, stream, u, b2, z, zg, n, r);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void ec_add_into_bf16(__nv_bfloat16* y, const float* d, int T, int n, cudaStream_t stream) {
  const long long m = (long long)T * n;
  if (m == 0) return;
  launch_kernel(add_into_bf16_kernel, blocks_for(m), kThreads, 0, stream, y, d, m);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
