#pragma once
// The MLP block of a decode step as one persistent launch (sm_90+, a few tokens, W4 gate / up / down):
//
//   x ← x + add;   h = RMSNorm(x) · w;   a = SiLU(h · Gateᵀ) ⊙ (h · Upᵀ);   x ← x + a · Downᵀ
//
// Why: op by op this block is five dependent launches (add + RMSNorm, the grouped gate/up GEMM, SwiGLU, the down
// GEMM, the residual add folded into the next norm), and on the H200 each launch of a decode step costs a few
// microseconds beyond its bytes (ramp, tail, the dependency on the previous kernel; README "Where the decode
// kernel's time goes"). Here one CTA per SM streams the weights of all its work back to back through one
// shared-memory ring (cp.async.bulk, the bulk-copy decode kernel's scheme): every CTA normalises x itself, takes
// gate/up row tiles (the same 16 rows of both, so SiLU(g) ⊙ u is applied in its epilogue), and, once every tile
// of a = SiLU(g) ⊙ u is written (an arrival counter in global memory), takes row tiles of Down and adds them into
// x. The weights of the down tiles are already in flight while the CTA waits.
//
// Results equal the op-by-op path with the same roundings (x + add, g, u, SiLU(g)·u and the down output are each
// rounded to bf16 as there; the norm sums in the same order as rms_norm.cu); only the GEMMs' fp32 summation order
// differs. Raw pointers and a stream, nothing of the engine.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "backend/cuda/w4a16_gemm.h"

namespace spear::cuda {

struct FusedMlpArgs {
  __nv_bfloat16* x = nullptr;             // [m][hidden], the residual stream, updated in place
  const __nv_bfloat16* add = nullptr;     // [m][hidden] added to x first (the attention block's output), or null
  const __nv_bfloat16* norm_w = nullptr;  // [hidden]
  float eps = 1e-5f;
  W4Device gate, up, down;       // gate / up [inter][hidden], down [hidden][inter]
  __nv_bfloat16* act = nullptr;  // [m][inter] scratch
  unsigned* counters = nullptr;  // kFusedMlpCounterBytes, zeroed once; every launch leaves them at zero
  int m = 0;
  int sm_count = 0;  // the device's SMs: one CTA each (all must be resident at once)
};
constexpr size_t kFusedMlpCounterBytes = 64;

// True when fused_mlp_decode takes these shapes on the current device: sm_90+, 1 <= m <= 8, hidden % 8 == 0,
// gate and up alike ([inter][hidden]), down [hidden][inter], per-channel or groups of a multiple of 16 (at most
// 256 groups per row), and the CTA's shared memory fits.
bool fused_mlp_supported(int m, const W4Device& gate, const W4Device& up, const W4Device& down);
// Enqueues the block (PDL-launched like the other kernels: only the weights are read before the wait). x, add,
// norm_w and act must be 16-byte aligned. Throws spear::Error when !fused_mlp_supported.
void fused_mlp_decode(const FusedMlpArgs& a, cudaStream_t stream);

}  // namespace spear::cuda
