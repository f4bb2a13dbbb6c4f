#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dense_gemv.h"
#include "backend/cuda/pdl.cuh"

namespace spear::cuda {

namespace {

constexpr int kWarps = 8;

// Block: kWarps warps, each computing rows r = blockIdx.x * kWarps * kRowsPerWarp + ... . x [M, k] is staged in
// shared memory as fp32 once per block; each lane reads 8 weights (16 bytes) per step.
template <int M>
__global__ void __launch_bounds__(kWarps * 32) dense_gemv_kernel(const __nv_bfloat16* __restrict__ x,
                                                                 const __nv_bfloat16* __restrict__ w, int n, int k,
                                                                 const __nv_bfloat16* __restrict__ bias, void* y,
                                                                 bool y_f32, int rows_per_warp, int m) {
  pdl_enter();
  extern __shared__ float xs[];  // [M][k], rows >= m zero
  for (int i = threadIdx.x; i < M * k; i += blockDim.x) xs[i] = i < m * k ? __bfloat162float(x[i]) : 0.f;
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = (blockIdx.x * kWarps + warp) * rows_per_warp;
  for (int rr = 0; rr < rows_per_warp; ++rr) {
    const int r = row0 + rr;
    if (r >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + size_t(r) * k);
    float acc[M];
#pragma unroll
    for (int t = 0; t < M; ++t) acc[t] = 0.f;
    const int steps = k / 8;
#pragma unroll 4
    for (int s = lane; s < steps; s += 32) {
      uint4 q;
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(q.x), "=r"(q.y), "=r"(q.z), "=r"(q.w)
                   : "l"(wr + s));
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
      float wf[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wf[2 * j] = __uint_as_float(words[j] << 16);
        wf[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
      }
#pragma unroll
      for (int t = 0; t < M; ++t) {
        // Two 16-byte shared loads per token (lanes read consecutive 32-byte pieces: 2-way bank conflicts at
        // most; eight scalar loads at a 32-byte lane stride would conflict 8 ways).
        const float4* xr = reinterpret_cast<const float4*>(xs + t * k + s * 8);
        const float4 a = xr[0], b = xr[1];
        acc[t] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y + wf[6] * b.z +
                  wf[7] * b.w;
      }
    }
#pragma unroll
    for (int t = 0; t < M; ++t) {
      float v = acc[t];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && t < m) {
        if (bias) v += __bfloat162float(bias[r]);
        if (y_f32)
          static_cast<float*>(y)[size_t(t) * n + r] = v;
        else
          static_cast<__nv_bfloat16*>(y)[size_t(t) * n + r] = __float2bfloat16(v);
      }
    }
  }
}

template <int M>
void launch(const __nv_bfloat16* x, int m, const __nv_bfloat16* w, int n, int k, const __nv_bfloat16* bias, void* y,
            bool y_f32, cudaStream_t stream) {
  const size_t smem = size_t(M) * k * sizeof(float);
  static bool attr_set = false;  // > 48 KB of shared memory needs the opt-in (host-only call, capture-safe)
  if (!attr_set) {
    int dev = 0, max_optin = 0;
    SPEAR_CUDA_CHECK(cudaGetDevice(&dev));
    SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    SPEAR_CUDA_CHECK(cudaFuncSetAttribute(dense_gemv_kernel<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    attr_set = true;
  }
  // Rows per warp: enough blocks for ~8 per SM on the largest heads, each warp a few rows to amortise staging x.
  const int rows_per_warp = n >= (1 << 16) ? 4 : 1;
  const int blocks = (n + kWarps * rows_per_warp - 1) / (kWarps * rows_per_warp);
  launch_kernel(dense_gemv_kernel<M>, blocks, kWarps * 32, smem, stream, x, w, n, k, bias, y, y_f32, rows_per_warp,
                m);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool dense_gemv_bf16(const __nv_bfloat16* x, int m, const __nv_bfloat16* w, int n, int k, const __nv_bfloat16* bias,
                     void* y, bool y_f32, cudaStream_t stream) {
  if (m < 1 || m > kDenseGemvMaxM || k % 8 != 0 || (reinterpret_cast<uintptr_t>(w) & 15) != 0) return false;
  if (size_t(m) * k * sizeof(float) > 200 * 1024) return false;
  switch (m) {
    case 1: launch<1>(x, m, w, n, k, bias, y, y_f32, stream); break;
    case 2: launch<2>(x, m, w, n, k, bias, y, y_f32, stream); break;
    case 3: case 4: launch<4>(x, m, w, n, k, bias, y, y_f32, stream); break;
    default: launch<8>(x, m, w, n, k, bias, y, y_f32, stream); break;
  }
  return true;
}

}  // namespace spear::cuda
