#pragma once
// y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias) for bf16 W and x, fp32 accumulation, fp32 or bf16 y, for few tokens
// (m <= kDenseGemvMaxM): the lm_head of a decode step, where cuBLAS' bf16-in/fp32-out GEMM picks a slow
// kernel for m = 1. Memory-bound: one warp per output row, 16-byte loads of W, x held in shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

inline constexpr int kDenseGemvMaxM = 8;

// Requires k % 8 == 0 and 16-byte aligned w and x (true for every checkpoint's hidden size); else returns false
// and does nothing, so the caller can fall back to cuBLAS.
bool dense_gemv_bf16(const __nv_bfloat16* x, int m, const __nv_bfloat16* w, int n, int k, const __nv_bfloat16* bias,
                     void* y, bool y_f32, cudaStream_t stream);

}  // namespace spear::cuda
