// Host-side pieces shared by w4a16_gemm.cu (general kernel, options, public entry points), w4a16_gemm_ec.cu (the
// compensated entry points) and w4a16_decode*.cu (decode kernels, their planner and launchers). Internal to the CUDA
// backend.
// The state behind these functions (device facts cache, options) lives in w4a16_gemm.cu, once per process.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_common.cuh"
#include "backend/cuda/w4a16_gemm.h"

namespace spear::cuda::w4_detail {

int token_tiles(int m);  // T for a launch of m <= 128 tokens

// The process-wide options (defaults overridable by environment variables, read once) and the checks of a device
// matrix that every public entry point runs first (w4a16_gemm.cu).
W4GemmOptions options_now();
void check_device_weights(const W4Device& w);
// The members of a grouped launch: each matrix's sizes and pointers, its output, and its compensator where one is
// attached (`who` names the entry point in the messages).
void check_launch_members(const char* who, const W4Device* w, int count, __nv_bfloat16* const* y,
                          const W4EcDevice* const* ec);

// Per-device facts, read once (host queries only: no sync, no stream work, so the first call may happen
// inside a graph capture). The first call on a device also raises every instance's dynamic shared-memory
// limit (both kernels) to the most it can ask for, so captures never meet a first use. (w4a16_gemm.cu)
struct DeviceFacts {
  int device = -1;
  int major = 0;
  size_t smem_per_sm = 0, smem_optin = 0, smem_reserved = 0;
};
const DeviceFacts& device_facts();

// Raises the dynamic shared-memory limit of the decode kernel instance (T, grouped) (w4a16_decode.cu; called
// by device_facts()).
void set_decode_max_smem(int T, bool grouped, int bytes);

// The decode kernel over count matrices sharing x; false when no plan fits (the caller takes the general path).
// (w4a16_decode.cu)
// general (optional): set when the launch's tuned plan is the general kernel (then false is returned too).
bool launch_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                   __nv_bfloat16* const* y, int sm_count, const W4GemmOptions& o, cudaStream_t stream,
                   bool* general = nullptr);

// The decode kernel with the P2P dual-write of its output (w4a16_decode.cu); false when it cannot take it.
bool launch_decode_mirrored(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias,
                            __nv_bfloat16* y, const W4PeerMirror& mirror, int sm_count, const W4GemmOptions& o,
                            cudaStream_t stream);

// The decode launch with fused error compensators (w4a16_decode.cu); false when it cannot take it.
bool ec_fusable(int m, const W4Device* w, int count, const W4EcDevice* const* ec);
bool launch_decode_ec(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4EcDevice* const* ec,
                      const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count,
                      const W4GemmOptions& o, cudaStream_t stream);

// The projection-only form (w4a16_gemm_ec_project, w4a16_gemm_ec_project_group; w4a16_decode_plan.cu): z[i] for
// every ecs[i] set, gated or not.
bool launch_decode_ec_project(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                              const W4EcDevice* const* ecs, const __nv_bfloat16* const* bias,
                              __nv_bfloat16* const* y, float* const* z, bool gated, int sm_count,
                              const W4GemmOptions& o, cudaStream_t stream);

// The decode launch with the decode-step fusions (w4a16_decode_plan.cu), with fused compensators where ec is set;
// false when it cannot take it.
bool decode_fusable(int m, const W4Device* w, int count, const W4Fusion& f, __nv_bfloat16* const* y,
                    const W4EcDevice* const* ec = nullptr);
bool launch_decode_fused(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4Fusion& f,
                         const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count,
                         const W4GemmOptions& o, cudaStream_t stream, const W4EcDevice* const* ec = nullptr);

// Decode-plan tuning (w4a16_decode.cu; the public entry points in w4a16_gemm.cu check the arguments first).
// general: enqueues the launch on the general kernel (plain launches of more than 16 tokens, where the caller has a
// workspace for it): timed beside the decode plans, and run at this m where it wins (kGeneralPlan).
bool tune_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y, void* flush,
                 size_t flush_bytes, int sm_count, cudaStream_t stream, int reps, const W4EcDevice* const* ec,
                 const W4Fusion* fusion = nullptr, const std::function<void()>* before = nullptr,
                 const std::function<void()>* general = nullptr);
bool decode_tuned(int m, const W4Device* w, int count, const W4EcDevice* const* ec);
std::pair<int, int> decode_plan(int m, const W4Device* w, int count, int sm_count);
void clear_tuning();
// The bulk-copy decode kernel (w4a16_decode_bulk.cu): m <= 8 on sm_90+; a decode plan with R == kBulkPlan
// (forced by W4GemmOptions::decode_rows = -1, or picked by tune_decode) runs it. Fused compensators (ec,
// ec_info: w4a16_decode_plan.h) only where bulk_ec_takes (one wave with EC CTAs, any number in clusters), with or
// without the decode-step fusions.
constexpr int kBulkPlan = -1;
// The scale groups a bulk-kernel instance handles, so that its k-step loop carries no group logic it does not need:
// the general form tests the group per k-step, and those branches keep the compiler from overlapping the k-steps'
// loads and MMAs (8B gate/up at one token: 20.2 -> 16.5 µs alone, 21.1 -> 13.5 µs back to back). group_mode: the
// mode of a launch's matrices (kAnyGroups when they differ).
enum DecodeGroupMode { kPerChannel = 0, kWholeKBlocks = 1, kAnyGroups = 2 };
inline int group_mode(const W4Device* w, int count) {
  auto mode = [](const W4Device& d) {
    return d.groups <= 1 ? kPerChannel : (d.group_size / 16) % 4 == 0 ? kWholeKBlocks : kAnyGroups;
  };
  const int m0 = mode(w[0]);
  for (int i = 1; i < count; ++i)
    if (mode(w[i]) != m0) return kAnyGroups;
  return m0;
}
// A tuned plan of R == kGeneralPlan: the launch runs on the general kernel (launch_decode returns false, *general set).
constexpr int kGeneralPlan = -2;
struct EcPlanInfo;
bool bulk_takes(int m, const W4Device* w, int count);
void launch_bulk(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                 __nv_bfloat16* const* y, const W4GemmOptions& o, cudaStream_t stream,
                 const W4Fusion* fusion = nullptr, const W4EcDevice* const* ec = nullptr,
                 const EcPlanInfo* ec_info = nullptr, int ec_w4_gate = 0, float* const* ec_z = nullptr);
// A projection-only launch (EcPlanInfo::project, ec_z given to launch_bulk) fits the bulk kernel. Any number of
// waves: its W4 CTAs wait for nobody.
bool bulk_project_takes(int m, const W4Device* w, int count, const EcPlanInfo& ec);
void set_bulk_max_smem(int bytes);  // raises its dynamic shared-memory limit (device_facts())
void set_mlp_fused_max_smem(int bytes);  // the same for the fused MLP block (mlp_fused.cu)

// One launch with the optional cluster shape (cluster_x, cluster_y, 1) and programmatic stream serialization (PDL).
template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, size_t smem, int cluster_y, bool pdl, cudaStream_t stream,
            const Params& params, int threads = kThreads, int cluster_x = 1) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(unsigned(threads), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (cluster_y > 1 || cluster_x > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = unsigned(std::max(cluster_x, 1));
    attrs[n].val.clusterDim.y = unsigned(cluster_y);
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = n ? attrs : nullptr;
  cfg.numAttrs = n;
  SPEAR_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, params));
}

}  // namespace spear::cuda::w4_detail
