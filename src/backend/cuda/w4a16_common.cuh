// Shared pieces of the two W4A16 GEMM kernels (w4a16_gemm.cu: general split-K kernel; w4a16_decode.cu: decode
// kernel for m <= 32): tile constants, PTX wrappers (streaming weight loads, cp.async, ldmatrix, mma, PDL),
// the exact dequantization of the shuffled 4-bit codes (layout: w4a16_gemm.cu) and the per-lane steps that
// both kernels perform identically. Everything here is __device__ __forceinline__ (or constexpr): including
// this header adds no symbol and no state.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backend/cuda/pdl.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the W4A16 GEMM needs sm_80 or newer (bf16 mma.sync, cp.async); configure with -DCMAKE_CUDA_ARCHITECTURES=90a"
#endif

namespace spear::cuda::w4_detail {

constexpr int kWarps = 8;                  // warps per CTA (both kernels)
constexpr int kThreads = kWarps * 32;
constexpr int kCtaRows = kWarps * 16;      // output features per CTA of the general kernel
constexpr int kKBlock = 64;                // columns per k-block (one uint4 per lane)
constexpr int kDecMaxTokens = 32;          // the decode kernel takes m <= 32 (T <= 4)
constexpr int kDecMaxCluster = 8;          // CTAs per cluster of the decode kernel (W4GemmOptions::decode_splits)

// ------------------------------------------------------------------------------------------ device helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// 128-bit streaming load of weights: not kept in L1, first to go from L2.
__device__ __forceinline__ uint4 ld_weights(const uint4* p, uint64_t pol) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p), "l"(pol));
  return r;
}

// 16-byte async copy global → shared; valid == false writes 16 zero bytes (src is not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- mbarriers and bulk (TMA) copies, sm_90 (the bulk-copy decode kernel; no-ops when compiled for older GPUs)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SPEAR_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define SPEAR_SM90_ASM(...) ((void)0)
#endif
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
  SPEAR_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
// One arrival that also expects `bytes` more of asynchronous copies to complete on b.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, unsigned bytes) {
  SPEAR_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  SPEAR_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
// Spins until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  SPEAR_SM90_ASM("{\n .reg .pred p;\n WAIT: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT;\n}" ::"r"(
                     smem_u32(b)),
                 "r"(parity)
                 : "memory");
}
// Global → shared bulk copy completing on mbarrier b (bytes and both addresses multiples of 16), evict-first in L2.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes, uint64_t* b,
                                                    uint64_t pol) {
  SPEAR_SM90_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(b)), "l"(pol)
      : "memory");
}
#undef SPEAR_SM90_ASM

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr) : "memory");
}

// c[16 features × 8 tokens] += a[16 × 16] · b[16 × 8], bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (w & 0x000F000F) | 0x43004300: the bf16 pair {128 + w[0:4), 128 + w[16:20)}.
__device__ __forceinline__ uint32_t nibbles_to_bf16x2(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x43004300));
  return r;
}

// a + b as a · 1 + b (one HFMA2; sm_80 has no bf16x2 add): exact here, every value is an integer below 256.
__device__ __forceinline__ uint32_t bf16x2_add(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(0x3F803F80u), "r"(b));
  return r;
}

// The bf16x2 pair {−(128 + z), −(128 + z)} from the stored bf16 bits of 128 + z.
__device__ __forceinline__ uint32_t neg_zero_pair(uint32_t bits) { return (bits | (bits << 16)) ^ 0x80008000u; }

// A fragment of one k-step (exact integers q − z): a0/a2 are row g (nz_lo = −(128 + z) pair), a1/a3 row g + 8.
__device__ __forceinline__ void dequant_fragment(uint32_t w, uint32_t nz_lo, uint32_t nz_hi, uint32_t (&a)[4]) {
  a[0] = bf16x2_add(nibbles_to_bf16x2(w), nz_lo);
  a[1] = bf16x2_add(nibbles_to_bf16x2(w >> 4), nz_hi);
  a[2] = bf16x2_add(nibbles_to_bf16x2(w >> 8), nz_lo);
  a[3] = bf16x2_add(nibbles_to_bf16x2(w >> 12), nz_hi);
}

// ------------------------------------------------------------------------------------------ shared lane steps

// Fills a warp's weight ring: lane's uint4 of k-blocks kb0 .. kb0 + P − 1 (zeros past kb1 or when inactive).
template <int P>
__device__ __forceinline__ void fill_weight_ring(uint4 (&ring)[P], const uint4* wq, int kb0, int kb1, bool active,
                                                 uint64_t pol) {
#pragma unroll
  for (int i = 0; i < P; ++i)
    ring[i] = (active && kb0 + i < kb1) ? ld_weights(wq + size_t(kb0 + i) * 32, pol) : make_uint4(0, 0, 0, 0);
}

// Per channel: zero points (bf16x2 pairs of −(128 + z)) and scales of rows r_lo / r_hi.
__device__ __forceinline__ void load_channel_params(const float* scales, const uint16_t* zeros, int r_lo, int r_hi,
                                                    uint32_t& nz_lo, uint32_t& nz_hi, float& sc_lo, float& sc_hi) {
  nz_lo = neg_zero_pair(zeros[r_lo]);
  nz_hi = neg_zero_pair(zeros[r_hi]);
  sc_lo = scales[r_lo];
  sc_hi = scales[r_hi];
}

// One 16-byte segment (8 bf16) of a staged x row: x[r][col, col + 8) ∩ [0, xlim), zero elsewhere and when
// !row_ok. vec: cp.async (x 16-byte aligned and k % 8 == 0, so a segment is wholly inside or outside).
__device__ __forceinline__ void stage_x_segment(__nv_bfloat16* d, const __nv_bfloat16* x, int k, int r, int col,
                                                int xlim, bool row_ok, bool vec) {
  if (vec) {
    const bool ok = row_ok && col < xlim;
    cp_async16(smem_u32(d), ok ? x + size_t(r) * k + col : x, ok);
  } else {
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      uint32_t lo = 0, hi = 0;
      if (row_ok && col + 2 * e < xlim) lo = __bfloat16_as_ushort(x[size_t(r) * k + col + 2 * e]);
      if (row_ok && col + 2 * e + 1 < xlim) hi = __bfloat16_as_ushort(x[size_t(r) * k + col + 2 * e + 1]);
      v[e] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(d) = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// Zero the totals and the current group's sums.
template <int T>
__device__ __forceinline__ void zero_accumulators(float (&acc)[T][4], float (&part)[T][4]) {
#pragma unroll
  for (int tt = 0; tt < T; ++tt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[tt][e] = part[tt][e] = 0.f;
}

// Grouped: fold the finished group's sums into the totals with its fp32 scales, and clear them.
template <int T>
__device__ __forceinline__ void fold_group(float (&acc)[T][4], float (&part)[T][4], float sc_lo, float sc_hi) {
#pragma unroll
  for (int tt = 0; tt < T; ++tt) {
    acc[tt][0] = fmaf(part[tt][0], sc_lo, acc[tt][0]);
    acc[tt][1] = fmaf(part[tt][1], sc_lo, acc[tt][1]);
    acc[tt][2] = fmaf(part[tt][2], sc_hi, acc[tt][2]);
    acc[tt][3] = fmaf(part[tt][3], sc_hi, acc[tt][3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) part[tt][e] = 0.f;
  }
}

// Grouped: the group of the current k-step and the first k-step of the next one; starting "one group before"
// makes the first k-step (of k-block kb0) load its group's parameters.
__device__ __forceinline__ void start_groups(int kb0, int group_size, int groups, int& grp, int& grp_next) {
  grp = min(kb0 * kKBlock / group_size, groups - 1) - 1;
  grp_next = kb0 * 4;
}

// Grouped: a new group starts (after fold_group): step the cursor; the caller then loads its parameters.
__device__ __forceinline__ void advance_group(int& grp, int& grp_next, int groups, int group_steps) {
  ++grp;
  grp_next = grp >= groups - 1 ? INT_MAX : (grp + 1) * group_steps;
}

// Grouped: scales and zero points of rows g / g + 8 from the staged group slot.
__device__ __forceinline__ void load_group_params(const float* ss, const uint16_t* zs, int slot, float& sc_lo,
                                                  float& sc_hi, uint32_t& nz_lo, uint32_t& nz_hi) {
  sc_lo = ss[slot];
  sc_hi = ss[slot + 8];
  nz_lo = neg_zero_pair(zs[slot]);
  nz_hi = neg_zero_pair(zs[slot + 8]);
}

// ldmatrix row of this lane inside a pair of token tiles (x4: tiles tt, tt + 1; x2 for T = 1: one tile).
template <int T>
__device__ __forceinline__ int ldmatrix_row(int lane) {
  return (T == 1 ? 0 : (lane >> 4) * 8) + (lane & 7);
}

// The four k-steps of one k-block (one uint4 of codes per lane): kstep(codes, x address, k-step index).
template <typename KStep>
__device__ __forceinline__ void kblock_steps(const uint4& w, uint32_t xa, int b, KStep&& kstep) {
  kstep(w.x, xa, 4 * b);
  kstep(w.y, xa + 32, 4 * b + 1);
  kstep(w.z, xa + 64, 4 * b + 2);
  kstep(w.w, xa + 96, 4 * b + 3);
}

}  // namespace spear::cuda::w4_detail
