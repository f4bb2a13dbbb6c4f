// ec_apply_bf16: a deferred compensator's term added on its own (ec_term.h).
#include "backend/cuda/ec_term.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_term.cuh"
#include "backend/cuda/pdl.cuh"
#include "core/error.h"

namespace spear::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void ec_apply_kernel(__nv_bfloat16* y, int n, const EcTerm t) {
  const int tok = blockIdx.y;
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) ec_term_prefetch(t, i, 1);
  pdl_enter();
  if (i < n) y[size_t(tok) * n + i] = ec_term_add(t, tok, i, y[size_t(tok) * n + i]);
}

}  // namespace

void ec_apply_bf16(__nv_bfloat16* y, int m, int n, const EcTerm& t, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || !t) return;
  SPEAR_CHECK(t.gz && t.rank > 0 && t.rank % 8 == 0 && m <= 65535, "ec_apply_bf16: rank {} (a multiple of 8), m {}",
              t.rank, m);
  launch_kernel(ec_apply_kernel, dim3((n + kThreads - 1) / kThreads, m), kThreads, 0, stream, y, n, t);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
