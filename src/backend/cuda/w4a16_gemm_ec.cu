// The public entry points of the W4 decode launch with error compensators (w4a16_gemm.h): argument checks, then the
// launchers of w4a16_decode.cu / w4a16_decode_plan.cu. The kernels' side of the contract is in w4a16_ec.cuh.
#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_ec.cuh"
#include "backend/cuda/w4a16_gemm.h"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda {

using namespace w4_detail;

size_t w4a16_ec_scratch_bytes(int rank) { return ec_scratch_bytes(std::max(rank, 0)); }

void w4a16_ec_scratch_init(void* scratch, int rank) {
  SPEAR_CHECK(scratch && rank >= 1, "w4a16_ec_scratch_init: null scratch or rank {}", rank);
  SPEAR_CUDA_CHECK(cudaMemset(scratch, 0, kEcCounterBytes));
  SPEAR_CUDA_CHECK(cudaMemset(static_cast<char*>(scratch) + kEcCounterBytes, 0xFF,
                              ec_scratch_bytes(rank) - kEcCounterBytes));  // every entry tagged kEcNoEpoch
}

bool w4a16_ec_fusable(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  return m >= 1 && count >= 1 && count <= kW4MaxGrouped && w && ec_fusable(m, w, count, ec);
}

bool w4a16_gemm_ec(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4EcDevice* const* ec,
                   const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count, cudaStream_t stream) {
  SPEAR_CHECK(count >= 1 && count <= kW4MaxGrouped, "w4a16_gemm_ec: count {} (1..{})", count, kW4MaxGrouped);
  SPEAR_CHECK(w && y && x, "w4a16_gemm_ec: null x, matrix or output array");
  if (m <= 0) return true;
  check_launch_members("w4a16_gemm_ec", w, count, y, ec);
  const W4GemmOptions o = options_now();
  if (o.path == 2) return false;
  return launch_decode_ec(x, m, w, count, ec, bias, y, sm_count, o, stream);
}

bool w4a16_gemm_ec_project(const __nv_bfloat16* x, int m, const W4Device& w, const W4EcDevice& ec,
                           const __nv_bfloat16* bias, __nv_bfloat16* y, float* z, int sm_count, cudaStream_t stream) {
  SPEAR_CHECK(x && y && z, "w4a16_gemm_ec_project: null x, y or z");
  SPEAR_CHECK(ec.rank >= 1 && ec.A && ec.B && ec.scratch,
              "w4a16_gemm_ec_project: compensator of rank {} or with a null A, B or scratch", ec.rank);
  if (m <= 0) return true;
  check_device_weights(w);
  const W4GemmOptions o = options_now();
  if (o.path == 2) return false;
  const W4EcDevice* ecs[1] = {&ec};
  float* zs[1] = {z};
  return launch_decode_ec_project(x, m, &w, 1, ecs, &bias, &y, zs, false, sm_count, o, stream);
}

bool w4a16_gemm_ec_project_group(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                                 const W4EcDevice* const* ec, const __nv_bfloat16* const* bias,
                                 __nv_bfloat16* const* y, float* const* gz, int sm_count, cudaStream_t stream) {
  SPEAR_CHECK(x && y && ec && gz && count >= 1 && count <= kW4MaxGrouped,
              "w4a16_gemm_ec_project_group: null x, y, ec or gz, or {} matrices", count);
  for (int i = 0; i < count; ++i) {
    SPEAR_CHECK(y[i], "w4a16_gemm_ec_project_group: null y[{}]", i);
    if (ec[i])
      SPEAR_CHECK(ec[i]->rank >= 1 && ec[i]->A && ec[i]->B && ec[i]->scratch && gz[i],
                  "w4a16_gemm_ec_project_group: compensator {} has rank {} or a null A, B, scratch or gz", i,
                  ec[i]->rank);
  }
  if (m <= 0) return true;
  for (int i = 0; i < count; ++i) check_device_weights(w[i]);
  const W4GemmOptions o = options_now();
  if (o.path == 2) return false;
  return launch_decode_ec_project(x, m, w, count, ec, bias, y, gz, true, sm_count, o, stream);
}

}  // namespace spear::cuda
