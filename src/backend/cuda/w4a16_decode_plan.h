// The decode kernel's planning pieces shared by its launcher (w4a16_decode.cu) and its planner and tuner
// (w4a16_decode_plan.cu). Internal to the CUDA backend; include only from .cu files (w4a16_ec.cuh).
#pragma once

#include <cstddef>

#include "backend/cuda/w4a16_ec.cuh"
#include "backend/cuda/w4a16_ec_cluster.cuh"
#include "backend/cuda/w4a16_fusion.cuh"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda::w4_detail {

constexpr int kDecMaxMats = 4;
// Static shared memory of the decode kernel (the fused EC's epoch, the fusions' flags) comes off the opt-in
// limit: plans keep this margin below it (plan_decode), the instances' dynamic limit is the rest.
constexpr int kDecStaticSmemMargin = 2048;
// k-blocks of weights in flight per warp (4 registers each), within the 128 registers of 2 CTAs per SM.
// (8 measured faster than 16 on the H200 for T = 1 and 2 once the ring refills in place: dev/cuda/w4_stream_lab.cu.)
__host__ __device__ constexpr int dec_pipe(int, bool) { return 8; }
// CTAs per SM the registers allow (launch bounds): three for per-channel T <= 2, so that 24 warps hide the load
// latency (80 registers suffice); two otherwise (the grouped instances spill at 80).
__host__ __device__ constexpr int dec_min_blocks(int T, bool grouped) { return T <= 2 && !grouped ? 3 : 2; }

// Dynamic shared memory of the decode kernel: red [8 warps][T][32] float4, cred [R·T][32] float4,
// scales [gmax][16R] fp32, zeros [gmax][16R] u16, x [m][xs_stride] bf16, with fused ECs B rows [16R][rank] bf16,
// g ⊙ z and z [m][rank] fp32 and the gate's hidden [m][gate width (a multiple of 4)] fp32 (every part a
// multiple of 16 bytes). EC CTAs stage their slice of x at the start of the same space (ec_cta_smem_bytes).
__host__ __device__ constexpr size_t dec_smem_bytes(int T, int R, int gmax, int m, int xs_stride, int ec_rmax,
                                                    int ec_gmax) {
  return size_t(kWarps) * T * 512 + size_t(R) * T * 512 + size_t(gmax) * R * 16 * 6 + size_t(m) * xs_stride * 2 +
         size_t(R) * 16 * ec_rmax * 2 + size_t(m) * ec_rmax * 8 + size_t(m) * ec_gmax * 4 +
         size_t(ec_gate_floats(ec_rmax, ec_gmax)) * 4;
}

// The fused compensators of a launch as the planner needs them.
struct EcPlanInfo {
  int n = 0, rmax = 0, gmax = 0, cpr_max = 0;
  bool project = false;               // w4a16_gemm_ec_project: the W4 CTAs run plain, any number of waves
  bool project_gated = false;         // ... and the EC CTAs write g ⊙ z (w4a16_gemm_ec_project_group)
  int base_slices[kDecMaxMats] = {};  // k-slices of each EC (0: matrix without one)
  int cols(int S) const {             // EC CTA columns with S CTAs per cluster column
    int c = 0;
    for (int i = 0; i < kDecMaxMats; ++i) c += (base_slices[i] + S - 1) / S;
    return c;
  }
};

// 256-column chunks per k-slice of a rank-r EC over k: as few as keep the slices at most 64 (registers:
// rank / 8 rows × cpr chunks <= kEcRing per lane); 0 when no such split exists (not fusable).
int ec_cpr(int rank, int k);
// The kernels' form of one fused compensator: its EC CTAs are columns [col0, col0 + cols) of blockIdx.x, S
// k-slices per column (gridDim.y; base_slices: EcPlanInfo's).
W4DecEc dec_ec_of(const W4EcDevice& e, int k, int base_slices, int S, int col0);

// A decode launch's shape: R row tiles per CTA, S CTAs per cluster along k (R == kBulkPlan: the bulk-copy kernel).
struct DecodePlan {
  int R = 0, S = 0, kbw = 0, xs_stride = 0, gmax = 0;
  size_t smem = 0;
  double cost = 1e300;
  // Fused ECs: where the slice sum and the gate run (w4a16_ec.cuh): 1 in every W4 CTA after its reduction (the
  // shorter chain: small matrices), 0 once in the last EC CTA while the W4 CTAs stream (large ones); the bulk kernel
  // also 2-4: no EC CTAs, A·x summed inside clusters of 8, 16 or 4 W4 CTAs (w4a16_ec_cluster.cuh). Tuned with R, S.
  int ec_w4_gate = 0;
};

// force_r / force_s: 0 lets the model choose; a forced pair may leave CTAs without k-blocks (they only reduce).
// ec: the fused compensators of the launch (null: none). With them the plan adds their EC CTA columns and
// their shared memory, and must run in one wave (w4a16_ec.cuh: every CTA resident at once).
DecodePlan plan_decode(int T, int m, const W4Device* w, int count, int sm_count, int force_r, int force_s,
                       const EcPlanInfo* ec = nullptr);

// Whether the decode kernel takes the launch (m <= 32, up to 4 matrices of one kind and one k).
bool decode_takes(int m, const W4Device* w, int count);
EcPlanInfo ec_plan_info(int k, int count, const W4EcDevice* const* ec);

// One launch of the decode kernel with the plan (w4a16_decode.cu); ec / ec_info: fused compensators, mirror: the P2P
// dual-write of the output, fusion: the decode-step fusions (none of the three with another).
void launch_plan(const DecodePlan& plan, const __nv_bfloat16* x, int m, const W4Device* w, int count,
                 const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, const W4GemmOptions& o, cudaStream_t stream,
                 const W4EcDevice* const* ec = nullptr, const EcPlanInfo* ec_info = nullptr,
                 const W4PeerMirror* mirror = nullptr, const W4Fusion* fusion = nullptr,
                 float* const* ec_z = nullptr);

// The untuned choice of DecodePlan::ec_w4_gate: in the W4 CTAs below 4 MiB of weights per launch (measured on the
// H200: the EC-side gate saved 1-3 µs per launch from 8 MB up and cost about 2 µs at 0.5-3 MB).
int ec_w4_gate_default(const W4Device* w, int count);

// Whether the bulk-copy kernel takes the launch with these fused compensators, where ec_w4_gate puts them: with EC
// CTAs (0, 1) every CTA (EC CTAs and one per 16-row tile) resident at once on sm_count SMs; in clusters (2-4:
// w4a16_ec_cluster.cuh) every matrix's tiles whole clusters, any number of waves.
bool bulk_ec_takes(int m, const W4Device* w, int count, const EcPlanInfo& ec, int sm_count, int ec_w4_gate);

// The kernels' form of a W4Fusion (null: none).
W4FuseDev fuse_of(const W4Fusion* f);

}  // namespace spear::cuda::w4_detail
