#pragma once
// RoPE of q and k and the KV-cache append of a decoder layer in one launch (the decode step runs this instead of
// rope_bf16 twice and kv_append_bf16: three kernels into one). Same arithmetic as those kernels, so the results
// are bit-identical to them. Raw pointers and a stream; the batch arrays are device copies (graph-safe).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backend/cuda/attention.h"

namespace spear::cuda {

// For token t (position positions[t], sequence token_seq[t]): q[t] (n_heads heads) and k[t] (kv.kv_dim / head_dim
// heads) rotated in place (rotate-half convention, angle = position · inv_freq[i] in fp32), then k[t] and v[t]
// written into the sequence's pages at its position (as kv_append_bf16).
void rope_kv_append_bf16(__nv_bfloat16* q, __nv_bfloat16* k, const __nv_bfloat16* v, int T, int n_heads,
                         int head_dim, const int32_t* positions, const float* inv_freq, const int32_t* token_seq,
                         const DevSeq* seqs, const PagedKvLayer& kv, cudaStream_t stream);

}  // namespace spear::cuda
