// Device primitives of the peer-to-peer exchanges (p2p_reduce.cu, tp_tail.cu): flags released and acquired at
// system scope, so that another GPU's stores over NVLink are visible once its flag is; whole 16-byte remote stores;
// the global timer that bounds a spin-wait. Internal to the CUDA backend.
#pragma once

#include <cstdint>

namespace spear::cuda::peer {

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One 16-byte store (p 16-byte aligned). Spelled out because nvcc splits a plain uint4 assignment of these values
// into four 4-byte stores, which quadruples the NVLink write transactions.
__device__ __forceinline__ void st_v4(void* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// The LL protocol's line accesses: volatile, so that every poll reads memory again (not a cached line), 16 bytes at
// once; NVLink delivers at least each aligned 8-byte half whole, which is why every half carries the epoch.
__device__ __forceinline__ void st_volatile_v4(void* p, const uint4& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// One 8-byte LL half {payload word, epoch} (p 8-byte aligned): what the W4 GEMM's dual-write stores.
__device__ __forceinline__ void st_volatile_v2(void* p, uint32_t word, uint32_t epoch) {
  asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(word), "r"(epoch) : "memory");
}

__device__ __forceinline__ uint4 ld_volatile_v4(const void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace spear::cuda::peer
