#pragma once
// The error compensator as separate kernels (the naive path, DESIGN.md §4): the correctness reference and the
// benchmark baseline for the fused and overlapped paths. fp32 parameters and intermediates; the GEMMs are
// cuBLAS SGEMMs issued by the backend, these are the element-wise steps between them.
//   z = A·x;  h = silu(W1·z + b1);  u = W2·h + b2;  zg = (1 + tanh(u)) ⊙ z;  y += B·zg
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

// h[T, w] = silu(h + b1), in place.
void ec_bias_silu_f32(float* h, const float* b1, int T, int w, cudaStream_t stream);
// zg[T, r] = (1 + tanh(u + b2)) * z; zg may alias u.
void ec_gate_f32(const float* u, const float* b2, const float* z, float* zg, int T, int r, cudaStream_t stream);
// y[T, n] (bf16) += d[T, n] (fp32), one rounding.
void ec_add_into_bf16(__nv_bfloat16* y, const float* d, int T, int n, cudaStream_t stream);

}  // namespace spear::cuda
