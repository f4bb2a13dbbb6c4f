#pragma once
// Error Compensators (DESIGN.md §2): a small token-gated low-rank correction added to a quantized linear.
//
//   z = A·x                                    A [rank, in]
//   g = 1 + tanh(W2·silu(W1·z + b1) + b2)      W1 [gate, rank], b1 [gate], W2 [rank, gate], b2 [rank]
//   y = Q·x + B·(g ⊙ z)                        B [out, rank]
//
// gate_width == 0 is the static (ungated) compensator, g == 1. With W2 = 0 and b2 = 0 the gate is exactly 1,
// so a gated compensator starts as the static one. Parameters are fp32 in memory and bf16 in packages.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace spear {

struct Compensator {
  std::string module;  // e.g. "model.layers.3.mlp.down_proj"
  int in = 0, out = 0, rank = 0, gate_width = 0;
  std::vector<float> A;   // [rank, in]
  std::vector<float> B;   // [out, rank]
  std::vector<float> W1;  // [gate_width, rank]
  std::vector<float> b1;  // [gate_width]
  std::vector<float> W2;  // [rank, gate_width]
  std::vector<float> b2;  // [rank]

  bool gated() const { return gate_width > 0; }
  size_t param_count() const;
  size_t bytes() const { return 2 * param_count(); }  // as stored (bf16)
  // Sizes every array for (in, out, rank, gate_width), all zero.
  void resize(int in_, int out_, int rank_, int gate_width_);
  // Gate at its initial state: W1 ~ N(0, w1_std²) (seeded), b1 = W2 = b2 = 0, hence g == 1 exactly.
  void init_gate(int width, float w1_std, uint64_t seed);
  // Rounds every parameter to bf16 (what a package stores), so a trained EC and its reloaded copy agree.
  void round_to_bf16();
  void validate() const;  // throws spear::Error naming the module on any inconsistent size
};

// Bytes of a compensator of this shape (bf16), for placement under a budget.
size_t compensator_bytes(int in, int out, int rank, int gate_width);

// y[T, out] += B·(g ⊙ (A·x)) for x [T, in], row-major. Scratch is allocated internally; OpenMP over tokens
// when T is large. The fast path used by the CPU backend.
void compensator_apply(const Compensator& c, const float* x, int T, float* y);
// Its two halves, split where a row-parallel module sums z over the ranks (tensor parallelism):
// z[T, rank] = A·x, then y += B·(g(z) ⊙ z).
void compensator_project(const Compensator& c, const float* x, int T, float* z);
void compensator_expand(const Compensator& c, const float* z, int T, float* y);

// The same in plain loops with double accumulation: the reference the fast paths are tested against.
void compensator_apply_reference(const Compensator& c, const float* x, int T, float* y);

// The gate alone for one token: g[rank] from z[rank] (1 when static).
void compensator_gate(const Compensator& c, const float* z, float* g);

}  // namespace spear
