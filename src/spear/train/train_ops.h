#pragma once
// Forward and backward of every decoder op, on raw row-major fp32 pointers (llm.c style: one function per op
// and direction). Shapes are in the comments; T = tokens. Backward functions produce input gradients only:
// the model's weights are frozen. All accumulate in fp32 except where stated. Large loops use OpenMP; the
// GEMMs are Eigen's (threaded by Eigen when called outside a parallel region).
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "spear/compensator.h"

namespace spear::train {

// Activation buffers are 64-byte aligned. Not for speed: Eigen evaluates element-wise exp/tanh on the first
// elements before an aligned boundary with the scalar std:: function and on the rest with its vectorised
// one, which round differently, so with malloc's 16-byte alignment results would depend on heap addresses
// (measured: two identical decoders gave different logits). Aligned, every run gives the same bits.
template <class T>
struct Align64Allocator {
  using value_type = T;
  Align64Allocator() = default;
  template <class U>
  Align64Allocator(const Align64Allocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Align64Allocator<U>&) const { return true; }
};
using FloatBuf = std::vector<float, Align64Allocator<float>>;

// A sequence inside a token batch: rows [begin, begin + len), positions 0..len-1.
struct SeqRange {
  int begin = 0, len = 0;
};

// ---- RMSNorm: y = w ⊙ x / sqrt(mean(x²) + eps)
// x, y [T, d]; inv [T] receives 1 / sqrt(mean(x²) + eps).
void rms_norm_forward(const float* x, const float* w, int T, int d, float eps, float* y, float* inv);
// dx[T, d] += ∂/∂x of Σ dy ⊙ y.
void rms_norm_backward(const float* x, const float* w, const float* inv, const float* dy, int T, int d, float* dx);

// ---- Linear, frozen W [n, k]: forward is cpu_linear_f32. dx[T, k] = (or +=) dy[T, n] · W.
void linear_backward_input(const float* dy, int T, int n, const float* w, int k, float* dx, bool accumulate);

// ---- RoPE (rotate-half), cos/sin tables [max_pos, head_dim / 2] built as cpu_rope_f32 computes them.
struct RopeCache {
  int half = 0;
  std::vector<float> cos, sin;
};
RopeCache make_rope_cache(const std::vector<float>& inv_freq, int max_pos);
// x [T, n_heads * head_dim] rotated in place by +angle (forward) or -angle (backward: the transpose).
void rope_apply(float* x, int T, int n_heads, int head_dim, const int32_t* pos, const RopeCache& rc, bool inverse);

// ---- Causal GQA attention with an optional sliding window (query p sees keys j with p - window < j <= p;
// window 0 = unlimited), scale applied to q·k. q, out [T, n_heads * hd]; k, v [T, n_kv * hd];
// lse [T, n_heads] receives the log-sum-exp of each softmax row, for the backward to recompute probabilities.
struct AttentionShape {
  int n_heads = 0, n_kv = 0, hd = 0, window = 0;
  float scale = 1.f;
};
void attention_forward(const float* q, const float* k, const float* v, const std::vector<SeqRange>& seqs,
                       const AttentionShape& s, float* out, float* lse);
// dq (same shape as q), dk, dv (as k) are overwritten.
void attention_backward(const float* q, const float* k, const float* v, const float* lse, const float* dout,
                        const std::vector<SeqRange>& seqs, const AttentionShape& s, float* dq, float* dk, float* dv);

// ---- SwiGLU: y = silu(g) ⊙ u, n elements (outputs 64-byte aligned for reproducible results, see FloatBuf). Backward: dg = dy ⊙ u ⊙ silu'(g), du = dy ⊙ silu(g).
void swiglu_forward(const float* g, const float* u, int64_t n, float* y);
void swiglu_backward(const float* g, const float* u, const float* dy, int64_t n, float* dg, float* du);

// ---- Error compensator on a linear: y[T, out] += B·(gate ⊙ z), z = A·x.
// Saved for the backward: z [T, rank]; gated only: u [T, gate_width] = W1·z + b1 and
// th [T, rank] = tanh(W2·silu(u) + b2), so gate = 1 + th (kept as th: 1 - th² needs th, not 1 + th).
struct EcSaved {
  FloatBuf z, u, th;
};
void ec_forward(const Compensator& c, const float* x, int T, float* y, EcSaved& s);
// Parameter gradients ADDED into dA..db2 (sizes as the compensator's arrays; gate ones ignored when static);
// dx[T, in] += the input gradient when dx is not null.
void ec_backward(const Compensator& c, const float* x, int T, const EcSaved& s, const float* dy, float* dA, float* dB,
                 float* dW1, float* db1, float* dW2, float* db2, float* dx);

// ---- Distillation loss. For rows of student hidden hs and teacher hidden ht ([T, d], both final-normed),
// logits = h · headᵀ (head [V, d]); returns Σ_rows KL(softmax(teacher) || softmax(student)) (fp64 sum of
// per-row fp64 sums). When dhs is not null it receives ∂/∂hs of (returned sum) · grad_scale, [T, d].
double kl_loss(const float* hs, const float* ht, const float* head, int T, int d, int V, double grad_scale, float* dhs);

}  // namespace spear::train
