#pragma once
// Small bf16 kernels of the decoder on the GPU: embedding gather, residual add, SwiGLU, RoPE, conversions and
// greedy argmax. Statistics and transcendental functions in fp32. Raw pointers and a stream; every array that
// changes between decode steps (ids, positions) is read from device memory, so the kernels can be captured in
// a CUDA graph and replayed with new contents.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

// out[i, :] = table[ids[i], :] for i < n; table [*, cols] bf16; ids on the device.
void gather_rows_bf16(const __nv_bfloat16* table, int64_t cols, const int32_t* ids, int n, __nv_bfloat16* out,
                      cudaStream_t stream);
// x += y (n elements, fp32 add, one rounding).
void add_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, int64_t n, cudaStream_t stream);
// out = silu(gate) * up (n elements; out may alias gate), in fp32 as HF's LlamaMLP in fp32 would, one rounding.
void swiglu_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out, int64_t n,
                 cudaStream_t stream);
// In-place rotary embedding (rotate-half convention of HF Llama) of x [T, n_heads * head_dim]: for token t at
// position positions[t] and pair i < head_dim / 2, angle = positions[t] * inv_freq[i] (fp32, sincosf).
void rope_bf16(__nv_bfloat16* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
               cudaStream_t stream);
void f32_to_bf16(const float* in, __nv_bfloat16* out, int64_t n, cudaStream_t stream);
void bf16_to_f32(const __nv_bfloat16* in, float* out, int64_t n, cudaStream_t stream);
// out[r] = argmax_c x[r, c] (lowest index on ties, as std::max_element), x fp32 [rows, cols].
void argmax_rows_f32(const float* x, int rows, int cols, int32_t* out, cudaStream_t stream);

}  // namespace spear::cuda
