#pragma once
// The term a deferred error compensator leaves to the kernel that reads its output next (w4a16_gemm_ec_deferred):
//   y[t][i] := bf16(y[t][i] + Σ_j B[i][j] · gz[t][j])      (fp32 sum in j order, one rounding, as the naive add)
// The consumers (add_rms_norm_bf16, rope_kv_append_bf16, swiglu_ec_bf16) add it as they read y; ec_apply_bf16 is
// the same addition on its own (the fallback, and the reference of the tests). Raw pointers and a stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

struct EcTerm {
  const __nv_bfloat16* B = nullptr;  // [n][rank] (null: no term)
  const float* gz = nullptr;         // [m][rank]: g ⊙ z of each token, 16-byte aligned
  int rank = 0;                      // a multiple of 8
  __host__ __device__ explicit operator bool() const { return B != nullptr; }
};

// y [m][n] bf16 += the term, in place.
void ec_apply_bf16(__nv_bfloat16* y, int m, int n, const EcTerm& t, cudaStream_t stream);

}  // namespace spear::cuda
