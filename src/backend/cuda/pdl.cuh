// Programmatic dependent launch (PDL, sm_90+) for the kernels of the CUDA backend. A decode step is ~150
// small dependent launches; with PDL the next kernel of the stream is scheduled while the current one runs,
// so its launch latency (and, for the W4 kernels, its weight prefetch) overlaps instead of adding up.
//
// The rule that keeps it correct: every kernel started by launch_kernel() (or the W4 launchers) executes
// pdl_wait() in every CTA before it touches memory that an earlier kernel of the stream writes or reads
// (griddepcontrol.wait returns once the previous grid has completed and its writes are visible; since
// that grid also waited, the whole stream order is kept). pdl_launch_dependents() only lets the next grid
// be scheduled early; it never makes a result visible. Both are no-ops on older GPUs and in launches made
// without the attribute.
#pragma once

#include <utility>

#include <cuda_runtime.h>

#include "backend/cuda/cuda_check.h"

namespace spear::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// First statement of a kernel that does no independent work: wait for the previous one. Such a kernel is
// scheduled as soon as the kernel before it triggers (the W4 GEMMs do, right after issuing their weight
// prefetch), so its launch latency hides behind that kernel; it does not trigger early itself (its
// dependents start as it completes). Triggering at the start cascades: every kernel up to the next W4
// GEMM gets scheduled at once and that GEMM's CTAs land on a GPU still full of waiting CTAs (measured on
// the H200: 4% slower at batch 1 than no PDL at all, fixed decode plans).
__device__ __forceinline__ void pdl_enter() { pdl_wait(); }

// Whether launch_kernel() asks for PDL: the current device is sm_90+ and SPEAR_PDL is not 0 (A/B runs).
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_enabled(). The kernel
// must begin with pdl_enter() (or pdl_wait() before its first dependent access).
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (pdl_enabled()) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  SPEAR_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace spear::cuda
