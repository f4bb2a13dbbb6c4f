#pragma once
// An error compensator's whole term computed in the launch after its plain W4 GEMM (issue 6, the deferred EC):
//   z = A·x,  g = 1 + tanh(W2·silu(W1·z + b1) + b2)  (g = 1 for a static EC),  y' = bf16(y + B·(g ⊙ z))
// where y = x·Wᵀ came from the GEMM launch before, which then runs its plain plan and never waits for the EC.
// Two launches do it: the residual add + RMSNorm that follows o_proj / down_proj (add_rms_norm_ec_bf16), and a launch
// of its own for the compensated members of a group that shares x (ec_apply_bf16: q/k/v, gate/up). The arithmetic is
// the naive path's (ec_project, ec_expand_naive), up to the order of the fp32 sums.
//
// One cluster of C CTAs per (token, compensator): each CTA dots its k-slice of x with A's columns, the partial z
// cross the cluster once through distributed shared memory (summed in CTA order by every CTA alike), one warp
// applies the gate, and each thread adds 8 · rank products from its rows of B (loaded while z is summed). A's slice
// and B's rows go to L2 and the gate's parameters to shared memory before griddepcontrol.wait, while the GEMM runs.
// Raw pointers and a stream; graph-safe.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace spear::cuda {

struct EcTermArgs {
  int rank = 0, gate_width = 0;        // rank 8 or 16; gate width <= 64 (0: static)
  int k = 0;                           // the linear's input width
  const __nv_bfloat16* xin = nullptr;  // [rows][k] the linear's input
  const __nv_bfloat16* A = nullptr;    // [rank][k]
  const __nv_bfloat16* B = nullptr;    // [n][rank]
  const float* W1 = nullptr;           // [gate_width][rank]
  const float* b1 = nullptr;           // [gate_width]
  const float* W2 = nullptr;           // [rank][gate_width]
  const float* b2 = nullptr;           // [rank]
};

// Whether the kernels take an EC whose output has n features: rank 8 or 16; n and k multiples of 8 · C, where C
// (CTAs per cluster) is 8 when n and k are multiples of 64, else the fewest that cover n and k in slices of 1024
// (at most 8); x, A, B 16-byte aligned.
bool ec_term_takes(int n, const EcTermArgs& ec);

// x += bf16(y + B·(g ⊙ A·xin)), out = RMSNorm(x) · w (x, y, out [rows][d]; out must not alias x, y or xin). Requires
// ec_term_takes(d, ec), d / C <= 1024 (one 8-feature group per thread) and 16-byte aligned x, y, w, out.
bool add_rms_norm_ec_takes(int d, const EcTermArgs& ec, const void* x, const void* y, const void* w,
                           const void* out);
void add_rms_norm_ec_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, const EcTermArgs& ec, const __nv_bfloat16* w,
                          __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream);

// y[i] [rows][n[i]] += B_i·(g_i ⊙ A_i·x) for count <= 4 compensators of one rank over the same x (ec[i].xin equal),
// one launch. Requires ec_apply_takes.
constexpr int kEcApplyMax = 4;
bool ec_apply_takes(int count, const int* n, const EcTermArgs* ec, __nv_bfloat16* const* y);
void ec_apply_bf16(int count, const int* n, const EcTermArgs* ec, __nv_bfloat16* const* y, int rows,
                   cudaStream_t stream);

}  // namespace spear::cuda
