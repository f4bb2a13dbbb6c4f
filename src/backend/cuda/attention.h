#pragma once
// Causal GQA attention over a paged KV cache on the GPU, bf16 K/V, fp32 softmax.
//
// Paged layout (one pool per layer): k and v are [num_blocks][kBlockTokens][kv_dim] bf16; a sequence's KV slot
// owns a row of the block table, block_table[slot * max_blocks + j] = the pool block holding its positions
// [j * kBlockTokens, (j + 1) * kBlockTokens). The host allocates blocks before a step (backend/cuda/kv_cache.*).
//
// Batch description on the device (so a decode step can be a replayed CUDA graph): seqs[n_seqs] as
// SeqSlice (token_begin, n_tokens, pos0, kv_slot) and token_seq[T], the index into seqs of token t's sequence.
// Token t's absolute position is seqs[s].pos0 + (t - seqs[s].token_begin).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

inline constexpr int kBlockTokens = 16;

struct DevSeq {  // same layout as spear::SeqSlice
  int token_begin, n_tokens, pos0, kv_slot;
};

struct PagedKvLayer {
  __nv_bfloat16* k = nullptr;  // [num_blocks][kBlockTokens][kv_dim]
  __nv_bfloat16* v = nullptr;
  const int32_t* block_table = nullptr;  // [n_slots][max_blocks]
  int max_blocks = 0;
  int kv_dim = 0;
};

struct AttnShape {
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int window = 0;  // keys with pos > p - window; 0 = unlimited
  float scale = 1.f;
};

// Writes k, v [T, kv_dim] of every token into its sequence's pages at its position.
void kv_append_bf16(const __nv_bfloat16* k, const __nv_bfloat16* v, int T, const int32_t* token_seq,
                    const DevSeq* seqs, const PagedKvLayer& kv, cudaStream_t stream);

// out[T, n_heads * head_dim] = softmax(q·Kᵀ · scale + causal/window mask)·V for every token over the keys of
// its sequence at positions <= its own (the cache must already hold them: call kv_append_bf16 first).
// `max_ctx` bounds any sequence's pos0 + n_tokens in this batch (sizes shared memory / splits; the kernel reads
// the real lengths from seqs). decode = every sequence has n_tokens == 1 (T == n_seqs), which selects the
// decode kernel (one CTA per sequence and KV head, its query heads together).
void attention_bf16(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                    const PagedKvLayer& kv, const AttnShape& shape, int max_ctx, bool decode, __nv_bfloat16* out,
                    cudaStream_t stream);

// Decode split (flash-decoding) scratch: the splits' arrival counters, then fp32 partial outputs and
// log-sum-exps of every split. Bytes that cover any decode batch of up to max_tokens tokens with these heads
// on a cache of max_blocks pages per slot (on the current device: the split count follows its SM count).
// Allocate once and zero its first attention_workspace_zero_bytes() bytes (or all of it) once: every launch
// leaves the counters at zero again, so the workspace is reusable by every layer and step on one stream, and
// inside CUDA graphs; the rest needs no initialisation.
size_t attention_workspace_bytes(int max_tokens, int n_heads, int head_dim, int max_blocks);
size_t attention_workspace_zero_bytes();
// As above, with that workspace. The decode kernel splits each context over several CTAs when the batch alone
// does not fill the GPU (the split count depends on T, the heads, kv.max_blocks and workspace_bytes, never on
// context lengths, so a captured step stays valid as contexts grow). Without a workspace (nullptr, or the
// overload above) or with one too small for a split, one CTA takes a whole context: correct, slower for long
// contexts at small batch. Prefill ignores the workspace.
void attention_bf16(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                    const PagedKvLayer& kv, const AttnShape& shape, int max_ctx, bool decode, __nv_bfloat16* out,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Decode attention with RoPE and the KV append fused in: one launch in place of rope_kv_append_bf16 and then
// attention_bf16 (decode), equal to them bit for bit (out, and the cache rows written; rope_rotate.cuh). q [T,
// n_heads * head_dim] and k_new [T, kv_dim] arrive unrotated and stay so; v_new [T, kv_dim]; positions [T] and
// inv_freq [head_dim / 2] as for rope_kv_append_bf16. Every sequence has exactly one token (T == n_seqs): the
// CTAs of its last context split take the new key and value from k_new / v_new, not from the cache, which one of
// them fills. Workspace as above.
void attention_decode_rope_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k_new, const __nv_bfloat16* v_new,
                                int T, const int32_t* positions, const float* inv_freq, const int32_t* token_seq,
                                const DevSeq* seqs, int n_seqs, const PagedKvLayer& kv, const AttnShape& shape,
                                __nv_bfloat16* out, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace spear::cuda
