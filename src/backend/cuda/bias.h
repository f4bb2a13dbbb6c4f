#pragma once
// y[r, :] += bias for the cuBLAS linears (the W4A16 kernel adds its bias in its epilogue).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

void add_bias_bf16(__nv_bfloat16* y, const __nv_bfloat16* bias, int rows, int n, cudaStream_t stream);
void add_bias_f32(float* y, const __nv_bfloat16* bias, int rows, int n, cudaStream_t stream);

}  // namespace spear::cuda
