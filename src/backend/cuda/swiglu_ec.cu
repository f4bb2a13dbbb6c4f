// The SwiGLU launch with the gate / up EC terms (swiglu_ec.h). One thread per output feature, all tokens: its rows
// of B_g and B_u (rank bf16 each) go to registers before griddepcontrol.wait; after it, g ⊙ z of every token to
// shared memory, then per token two dot products of rank terms, the two roundings of the naive path, and SwiGLU.
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/swiglu_ec.h"
#include "backend/cuda/w4a16_fusion.cuh"  // swiglu_f: swiglu_bf16's arithmetic
#include "core/error.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 128;
constexpr int kChunks = kSwigluEcMaxRank / 8;  // 16-byte chunks of a B row

__device__ __forceinline__ float dot8(const uint4& b, const float* z) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    s = fmaf(f.x, z[2 * i], s);
    s = fmaf(f.y, z[2 * i + 1], s);
  }
  return s;
}

// B·gz of one row for one token: the row's chunks in order (rank / 8 of them), each summed on its own.
__device__ __forceinline__ float term(const uint4 (&b)[kChunks], const float* z, int chunks) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    if (c < chunks) s += dot8(b[c], z + 8 * c);
  return s;
}

__global__ void __launch_bounds__(kThreads) swiglu_ec_kernel(const bf16* gate, const bf16* up, bf16* out, int m,
                                                              int n, SwigluEcTerm g, SwigluEcTerm u) {
  __shared__ float zs[2][kSwigluEcMaxTokens * kSwigluEcMaxRank];
  const int i = int(blockIdx.x) * kThreads + int(threadIdx.x);
  const int cg = g.B ? g.rank / 8 : 0, cu = u.B ? u.rank / 8 : 0;
  uint4 bg[kChunks], bu[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // constants: before the wait, while the GEMM runs
    bg[c] = c < cg && i < n ? __ldg(reinterpret_cast<const uint4*>(g.B + size_t(i) * g.rank) + c) : uint4{};
    bu[c] = c < cu && i < n ? __ldg(reinterpret_cast<const uint4*>(u.B + size_t(i) * u.rank) + c) : uint4{};
  }
  pdl_launch_dependents();  // the down projection's weights may stream meanwhile (it waits for this grid)
  pdl_wait();
  for (int j = threadIdx.x; j < m * g.rank && cg; j += kThreads) zs[0][j] = g.gz[j];
  for (int j = threadIdx.x; j < m * u.rank && cu; j += kThreads) zs[1][j] = u.gz[j];
  __syncthreads();
  if (i >= n) return;
  for (int t = 0; t < m; ++t) {
    const size_t o = size_t(t) * n + i;
    float a = __bfloat162float(gate[o]), b = __bfloat162float(up[o]);
    if (cg) a = __bfloat162float(__float2bfloat16(a + term(bg, zs[0] + t * g.rank, cg)));
    if (cu) b = __bfloat162float(__float2bfloat16(b + term(bu, zs[1] + t * u.rank, cu)));
    out[o] = __float2bfloat16_rn(swiglu_f(a, b));
  }
}

bool term_ok(const SwigluEcTerm& e) {
  if (!e.B) return true;
  return e.gz && e.rank >= 8 && e.rank % 8 == 0 && e.rank <= kSwigluEcMaxRank &&
         reinterpret_cast<uintptr_t>(e.B) % 16 == 0;
}

}  // namespace

bool swiglu_ec_takes(int m, const SwigluEcTerm& g, const SwigluEcTerm& u) {
  return m >= 1 && m <= kSwigluEcMaxTokens && term_ok(g) && term_ok(u);
}

void swiglu_ec_bf16(const bf16* gate, const bf16* up, bf16* out, int m, int n, const SwigluEcTerm& g,
                    const SwigluEcTerm& u, cudaStream_t stream) {
  SPEAR_CHECK(swiglu_ec_takes(m, g, u), "swiglu_ec_bf16: {} tokens or ranks {} / {} not taken", m, g.rank, u.rank);
  if (n <= 0) return;
  launch_kernel(swiglu_ec_kernel, dim3((n + kThreads - 1) / kThreads), dim3(kThreads), 0, stream, gate, up, out, m, n,
                g, u);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
