#pragma once
// RMSNorm on the GPU: bf16 activations in and out, fp32 statistics (as the HF reference: x·rsqrt(mean(x²)+eps)
// in fp32, then times the weight). Raw pointers and a stream, nothing of the engine.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

// x, out: [rows, d] bf16 row-major (out may alias x); w: [d] bf16.
void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int rows, int d, float eps,
                   cudaStream_t stream);

// x += y (one bf16 rounding, as add_bf16), then out = RMSNorm(x): bit-identical to add_bf16 then rms_norm_bf16,
// in one launch (out must not alias x or y).
void add_rms_norm_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, const __nv_bfloat16* w, __nv_bfloat16* out,
                       int rows, int d, float eps, cudaStream_t stream);

}  // namespace spear::cuda
