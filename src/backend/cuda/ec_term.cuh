// Device side of ec_term.h: the one definition of a deferred compensator's term that every consumer uses, so that
// a fused consumer is bit-identical to ec_apply_bf16 followed by the plain kernel. Internal to the CUDA backend.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "backend/cuda/ec_term.h"

namespace spear::cuda {

// Σ_j B[i][j] · gz[tok][j] in j order (one fp32 chain).
__device__ __forceinline__ float ec_term_at(const EcTerm& t, int tok, int i) {
  const uint4* b = reinterpret_cast<const uint4*>(t.B + size_t(i) * t.rank);
  const float4* z = reinterpret_cast<const float4*>(t.gz + size_t(tok) * t.rank);
  float s = 0.f;
  for (int j = 0; j < t.rank / 8; ++j) {
    const uint4 bv = __ldg(b + j);
    const float4 z0 = z[2 * j], z1 = z[2 * j + 1];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&bv);
    const float2 b0 = __bfloat1622float2(h[0]), b1 = __bfloat1622float2(h[1]);
    const float2 b2 = __bfloat1622float2(h[2]), b3 = __bfloat1622float2(h[3]);
    s = fmaf(b0.x, z0.x, s);
    s = fmaf(b0.y, z0.y, s);
    s = fmaf(b1.x, z0.z, s);
    s = fmaf(b1.y, z0.w, s);
    s = fmaf(b2.x, z1.x, s);
    s = fmaf(b2.y, z1.y, s);
    s = fmaf(b3.x, z1.z, s);
    s = fmaf(b3.y, z1.w, s);
  }
  return s;
}

// y with the term of (tok, i) added (y itself without a term).
__device__ __forceinline__ __nv_bfloat16 ec_term_add(const EcTerm& t, int tok, int i, __nv_bfloat16 y) {
  return t.B ? __float2bfloat16_rn(__bfloat162float(y) + ec_term_at(t, tok, i)) : y;
}

// Before griddepcontrol.wait: rows [i0, i0 + count) of B into L2 (constants; the consumer reads them after its wait,
// when they would otherwise be a DRAM round trip on its critical path).
__device__ __forceinline__ void ec_term_prefetch(const EcTerm& t, int i0, int count) {
  if (!t.B) return;
  const char* p = reinterpret_cast<const char*>(t.B + size_t(i0) * t.rank);
  const size_t bytes = size_t(count) * t.rank * 2;
  for (size_t o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
}

}  // namespace spear::cuda
