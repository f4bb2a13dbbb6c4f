#pragma once
// The overlapped EC path's two kernels (issue 6, DESIGN.md §5). The side stream computes z = A·x (cuBLAS, bf16 in,
// fp32 out) and then ec_gate_rows_f32, the whole gate in one launch; after the join the main stream adds the term
// with ec_expand_add_bf16, reading g ⊙ z and B directly. Together they replace the naive path's five element-wise
// and SGEMM launches of the gate and B and its fp32 term matrix [m][n] (written on one stream, read on the other:
// at prefill, 4 bytes per output element each way). The arithmetic is the naive path's (ec_naive.h), in fp32, with
// one rounding of y + B·(g ⊙ z); only the order of the fp32 sums differs. Raw pointers and a stream; graph-safe.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

// zg[t] = (1 + tanh(W2·silu(W1·z[t] + b1) + b2)) ⊙ z[t] for t < T; z, zg [T][r], W1 [w][r], b1 [w], W2 [r][w],
// b2 [r], all fp32. One warp per token; zg may alias z. w >= 1 (a static EC has no gate: use z as is).
void ec_gate_rows_f32(const float* z, const float* W1, const float* b1, const float* W2, const float* b2, float* zg,
                      int T, int r, int w, cudaStream_t stream);

// y[t][j] = bf16(y[t][j] + Σ_i zg[t][i]·B[j][i]) for t < T, j < n; y bf16 [T][n], zg fp32 [T][r], B fp32 [n][r].
// Any r >= 1; ranks 8, 16, 32 and 64 keep B's rows in registers.
void ec_expand_add_bf16(__nv_bfloat16* y, const float* zg, const float* B, int T, int n, int r, cudaStream_t stream);

}  // namespace spear::cuda
