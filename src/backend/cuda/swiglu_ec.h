#pragma once
// The SwiGLU launch of a decode step with the gate / up projections' EC terms added first (issue 6):
//   out = silu(bf16(gate + B_g·gz_g)) ⊙ bf16(up + B_u·gz_u)    (each term only where that linear has an EC)
// where gate, up come from the plain grouped W4 launch before it and gz = g ⊙ z [m][rank] (fp32) from that launch's
// EC CTAs (w4a16_gemm_ec_project_group), which nothing in the GEMM launch waits for: the compensator's chain (the
// k-slices of A·x, their sum, the gate) runs beside the gate/up weight stream, and what is left here is a dot product
// of rank terms per element, its B rows loaded before griddepcontrol.wait. The roundings are the naive path's
// (the GEMM's bf16 output, y + B·(g ⊙ z) rounded once, then swiglu_bf16), up to the order of the fp32 sums.
// Raw pointers and a stream; graph-safe.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

struct SwigluEcTerm {
  const __nv_bfloat16* B = nullptr;  // [n][rank] bf16 (null: this linear has no EC)
  const float* gz = nullptr;         // [m][rank] fp32: g ⊙ z
  int rank = 0;
};

constexpr int kSwigluEcMaxRank = 64;
constexpr int kSwigluEcMaxTokens = 32;
// rank % 8 == 0 and <= kSwigluEcMaxRank where B is set, B 16-byte aligned, 1 <= m <= kSwigluEcMaxTokens.
bool swiglu_ec_takes(int m, const SwigluEcTerm& g, const SwigluEcTerm& u);
// out [m][n] may alias gate (each element is read before the same thread writes it).
void swiglu_ec_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out, int m, int n,
                    const SwigluEcTerm& g, const SwigluEcTerm& u, cudaStream_t stream);

}  // namespace spear::cuda
