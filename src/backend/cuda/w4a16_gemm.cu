// W4A16 GEMM for Hopper (built for sm_90a, runs on sm_80+): y[m, n] = x[m, k] · dequant(W)ᵀ + bias with
// mma.sync m16n8k16 bf16.
//
// ---- Device layout of the codes (made by w4_prepare, w4a16_layout.cpp; read back by the reference kernel)
// W is padded to [n_pad, k_pad] (n_pad = round_up(n, 16), k_pad = round_up(k, 64); padding codes are the zero
// point, so padded weights are exactly 0). It is cut into 16-row tiles and 64-column k-blocks; one k-block of
// one tile is 512 bytes = 32 lanes × one uint4, and a tile's k-blocks follow each other, so a warp streams its
// tile along k with one coalesced 128-bit load per lane per k-block. For code (r, c):
//   tile = r / 16, kb = c / 64, j = (c % 64) / 16          (j: the 16-column k-step inside the k-block)
//   rr = r % 16, cc = c % 16                                 (position inside the 16 × 16 mma A tile)
//   lane = 4 · (rr % 8) + (cc % 8) / 2                       (the lane whose A fragment holds it)
//   i = rr / 8 + 2 · (cc / 8)                                (its fragment register a_i)
//   word = ((tile · (k_pad / 64) + kb) · 32 + lane) · 4 + j,   bit = 4 · i + 16 · (cc % 2)
//   code = (q[word] >> bit) & 15
// i.e. register a_i's bf16 pair {even column, odd column} sits in the nibbles at bits [4i, 4i+4) and
// [16+4i, 16+4i+4): lop3((w >> 4i) & 0x000F000F | 0x43004300) is the bf16x2 {128 + lo, 128 + hi}, and adding
// −(128 + zero) (stored as the bf16 of 128 + zero in W4Layout::zeros) gives the exact integers q − z.
// scales [groups][n_pad] fp32, zeros [groups][n_pad] bf16 bits of 128 + z; column c is in group
// min(c / group_size, groups − 1) (the clamp only matters for padding columns).
//
// ---- Two kernels
//  * decode kernel (m <= 32, also grouped launches of up to 4 matrices sharing x): see its own comment below;
//    built for latency — weights in flight before griddepcontrol.wait (PDL), x staged once, split-K reduced
//    in shared memory and across a thread-block cluster through distributed shared memory (no workspace);
//  * general kernel (any m <= 128; used for m > 32), described next.
// Both are launched with programmatic dependent launch on sm_90+ (W4GemmOptions::pdl): only the weights (q,
// scales, zeros) are read before griddepcontrol.wait; x, bias, y and the workspace only after it.
//
// ---- General kernel
// A CTA is 8 warps; warp w owns the 16-row tile 8 · blockIdx.x + w (128 output features per CTA) and the CTA
// owns the k-blocks [kb0, kb1) of split blockIdx.y. Tokens are the mma's B operand in T tiles of 8
// (T ∈ {1, 2, 4, 8, 16}, up to 128 tokens per launch; one template instance per T and per-channel/grouped).
//  * weights: each lane keeps a ring of P uint4 registers (P k-blocks in flight per warp), loaded with
//    ld.global.nc.L1::no_allocate and an L2 evict-first policy (streamed once, they must not push x, the
//    partial sums and the next layer's data out of L2);
//  * x: staged by cp.async in chunks of XC k-blocks (double-buffered; rows padded by 16 bytes so ldmatrix
//    is free of bank conflicts), zero-filled beyond k and beyond m; B fragments come from ldmatrix;
//  * dequantization: 3 shifts, 4 lop3 and 4 bf16x2 fma (+ −(128 + z)) per 8 codes, all exact;
//  * per channel: the mma accumulates Σ (q − z) · x in fp32 and the fp32 scale multiplies it in the epilogue;
//    grouped: the mma accumulates each group's Σ (q − z) · x into a separate fp32 fragment which is folded
//    into the total with the group's fp32 scale (fma) when the group ends. Both are as exact as fp32
//    accumulation allows: no weight is ever rounded to bf16 (unlike a bf16 scale × (q − z) product, which
//    would lose up to 2^-9 of every weight); only y is rounded to bf16 (and x is bf16 by contract);
//  * split-K: when the row tiles alone cannot keep every SM busy, the k-blocks are split; each CTA writes its
//    fp32 partial tile to the workspace, bumps the tile's arrival counter, and the last CTA to arrive sums
//    the partials in split order (deterministic whatever the arrival order), applies scale and bias, writes y
//    and sets the counter back to 0 (the workspace stays reusable and graph-safe: no memset, no host sync).
//    The counters sit at fixed offsets (kCounterSlots of them) before the partials, whatever the launch's n:
//    GEMMs of different shapes share one workspace, and a narrower GEMM's partials must never land on a wider
//    one's counters (they used to start right after the launch's own counters).
//
// ---- Reference kernel
// One thread per output element, dequantizing on the fly with the index math above, fp32 sums.
#include "backend/cuda/w4a16_gemm.h"

#include <algorithm>
#include <climits>
#include <deque>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include <cooperative_groups.h>

#include "backend/cuda/cuda_check.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "w4a16_gemm.cu needs sm_80 or newer (bf16 mma.sync, cp.async); configure with -DCMAKE_CUDA_ARCHITECTURES=90a"
#endif

namespace spear::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;                  // 16-row tiles per CTA
constexpr int kThreads = kWarps * 32;
constexpr int kCtaRows = kWarps * 16;      // output features per CTA
constexpr int kMaxTokens = 128;            // tokens per launch: 16 mma tiles of 8
constexpr int kDecMaxTokens = 32;          // the decode kernel takes m <= 32 (T <= 4)
constexpr int kKBlock = 64;                // columns per k-block (one uint4 per lane)

// Per token-tile count T: P = k-blocks of weights in flight per warp (register ring, 4·P registers),
// XC = k-blocks per staged x chunk (power of 2), and the occupancy the register budget is tuned for.
__host__ __device__ constexpr int pipe_depth(int T) { return T <= 2 ? 16 : (T == 4 ? 8 : 4); }
__host__ __device__ constexpr int chunk_kblocks(int T) { return T <= 4 ? 8 : 4; }
__host__ __device__ constexpr int min_ctas_per_sm(int T) { return T >= 16 ? 1 : 2; }
__host__ __device__ constexpr int x_row_stride(int T) { return chunk_kblocks(T) * kKBlock + 8; }  // bf16 elements
static_assert(pipe_depth(1) % chunk_kblocks(1) == 0 && pipe_depth(2) % chunk_kblocks(2) == 0 &&
                  pipe_depth(4) % chunk_kblocks(4) == 0 && pipe_depth(8) % chunk_kblocks(8) == 0 &&
                  pipe_depth(16) % chunk_kblocks(16) == 0,
              "a chunk must start at a fixed position of the unrolled ring loop");

struct W4GemmParams {
  const __nv_bfloat16* x;     // [m][k]
  __nv_bfloat16* y;           // [m][n]
  const __nv_bfloat16* bias;  // [n] or null
  const uint4* q;             // shuffled codes
  const float* scales;        // [groups][n_pad]
  const uint16_t* zeros;      // [groups][n_pad]
  float* partials;            // split-K: [row group][split][warp][token tile][lane] float4
  unsigned* counters;         // split-K: [row group]
  int m, n, k, n_pad, n_tiles, kblocks;
  int group_size, groups, group_steps;  // group_steps = group_size / 16 (k-steps per group)
  int gmax;                             // group slots per staged chunk (grouped only)
  int splits, kb_per_split;
  int x_vec;                            // x is 16-byte aligned and k % 8 == 0: cp.async 16-byte copies
};

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

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr) : "memory");
}

// Programmatic dependent launch (sm_90+; no-ops when the launch did not ask for it): wait until the previous
// kernel of the stream has completed and its memory is visible / let the next kernel of the stream start.
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

// ------------------------------------------------------------------------------------------ fast kernel

template <int T, bool kGrouped>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm(T)) w4a16_gemm_kernel(const W4GemmParams p) {
  constexpr int P = pipe_depth(T);
  constexpr int XC = chunk_kblocks(T);
  constexpr int XS = x_row_stride(T);  // 16-byte units per row are odd: ldmatrix rows hit distinct banks
  constexpr int kTok = 8 * T;
  constexpr int kSegsPerRow = XC * kKBlock / 8;  // 16-byte segments of one staged x row

  // Dynamic shared memory: x chunks [2][kTok][XS] bf16, then (grouped) scales [2][gmax][128] fp32 and
  // zeros [2][gmax][128] u16 of the groups the chunk touches.
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  float* ss = reinterpret_cast<float*>(smem + size_t(2) * kTok * XS * 2);
  uint16_t* zs = reinterpret_cast<uint16_t*>(ss + 2 * p.gmax * kCtaRows);
  __shared__ int s_last;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rg = blockIdx.x, split = blockIdx.y;
  const int row0 = rg * kCtaRows;
  const int tile = rg * kWarps + warp;
  const bool active = tile < p.n_tiles;  // warp-uniform; idle warps still take part in staging and barriers
  const int kb0 = split * p.kb_per_split;
  const int kb1 = min(p.kblocks, kb0 + p.kb_per_split);
  const int nchunks = (kb1 - kb0 + XC - 1) / XC;
  const int r_lo = tile * 16 + g, r_hi = r_lo + 8;  // the two output features of this lane

  // Stage x (and the groups' scales / zeros) for k-blocks [kb0 + c·XC, +XC) ∩ [kb0, kb1) into buffer c & 1.
  auto stage_chunk = [&](int c) {
    const int buf = c & 1;
    const int col0 = (kb0 + c * XC) * kKBlock;
    const int col_end = min(col0 + XC * kKBlock, kb1 * kKBlock);
    const int xlim = min(col_end, p.k);
    __nv_bfloat16* dst = xs + buf * kTok * XS;
    for (int i = tid; i < kTok * kSegsPerRow; i += kThreads) {
      const int r = i / kSegsPerRow, cs = i % kSegsPerRow;
      const int col = col0 + cs * 8;
      __nv_bfloat16* d = dst + r * XS + cs * 8;
      if (p.x_vec) {
        const bool ok = r < p.m && col < xlim;  // k % 8 == 0: a segment is wholly inside or outside
        cp_async16(smem_u32(d), ok ? p.x + size_t(r) * p.k + col : p.x, ok);
      } else {
        uint32_t v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          uint32_t lo = 0, hi = 0;
          if (r < p.m && col + 2 * e < xlim) lo = __bfloat16_as_ushort(p.x[size_t(r) * p.k + col + 2 * e]);
          if (r < p.m && col + 2 * e + 1 < xlim) hi = __bfloat16_as_ushort(p.x[size_t(r) * p.k + col + 2 * e + 1]);
          v[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(d) = make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
    if constexpr (kGrouped) {
      const int g_lo = min(col0 / p.group_size, p.groups - 1);
      const int g_hi = min((col_end - 1) / p.group_size, p.groups - 1);
      const int ng = g_hi - g_lo + 1;  // <= gmax
      float* sd = ss + buf * p.gmax * kCtaRows;
      uint16_t* zd = zs + buf * p.gmax * kCtaRows;
      for (int i = tid; i < ng * (kCtaRows / 4); i += kThreads) {
        const int gi = i / (kCtaRows / 4), row = row0 + (i % (kCtaRows / 4)) * 4;
        const bool ok = row < p.n_pad;
        cp_async16(smem_u32(sd + gi * kCtaRows + row - row0),
                   ok ? p.scales + size_t(g_lo + gi) * p.n_pad + row : p.scales, ok);
      }
      for (int i = tid; i < ng * (kCtaRows / 8); i += kThreads) {
        const int gi = i / (kCtaRows / 8), row = row0 + (i % (kCtaRows / 8)) * 8;
        const bool ok = row < p.n_pad;
        cp_async16(smem_u32(zd + gi * kCtaRows + row - row0),
                   ok ? p.zeros + size_t(g_lo + gi) * p.n_pad + row : p.zeros, ok);
      }
    }
  };

  // Weight ring: k-blocks kb0 .. kb0 + P − 1 in flight before anything else.
  const uint64_t pol = evict_first_policy();
  const uint4* wq = p.q + size_t(active ? tile : 0) * p.kblocks * 32 + lane;
  uint4 ring[P];
#pragma unroll
  for (int i = 0; i < P; ++i)
    ring[i] = (active && kb0 + i < kb1) ? ld_weights(wq + size_t(kb0 + i) * 32, pol) : make_uint4(0, 0, 0, 0);
  // PDL: the weights above do not depend on the previous kernel; x, bias, y and the workspace do.
  pdl_launch_dependents();
  pdl_wait();
  if (kb0 < kb1) stage_chunk(0);
  cp_async_commit();

  // Zero points (as bf16x2 pairs of −(128 + z)) and scales of rows r_lo / r_hi.
  uint32_t nz_lo = neg_zero_pair(0x4300u), nz_hi = nz_lo;
  float sc_lo = 0.f, sc_hi = 0.f;
  if constexpr (!kGrouped) {
    if (active) {
      nz_lo = neg_zero_pair(p.zeros[r_lo]);
      nz_hi = neg_zero_pair(p.zeros[r_hi]);
      sc_lo = p.scales[r_lo];
      sc_hi = p.scales[r_hi];
    }
  }
  // Grouped: the group of the current k-step and the first k-step of the next one; starting "one group
  // before" makes the first k-step load its group's parameters.
  int grp = 0, grp_next = INT_MAX, chunk_g_lo = 0, chunk_buf = 0;
  if constexpr (kGrouped) {
    grp = min(kb0 * kKBlock / p.group_size, p.groups - 1) - 1;
    grp_next = kb0 * 4;
  }

  float acc[T][4];   // totals: rows (g, g, g+8, g+8) × tokens (2t, 2t+1, 2t, 2t+1) of each token tile
  float part[T][4];  // grouped: the current group's sums
#pragma unroll
  for (int tt = 0; tt < T; ++tt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[tt][e] = part[tt][e] = 0.f;

  auto fold_group = [&]() {
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
      acc[tt][0] = fmaf(part[tt][0], sc_lo, acc[tt][0]);
      acc[tt][1] = fmaf(part[tt][1], sc_lo, acc[tt][1]);
      acc[tt][2] = fmaf(part[tt][2], sc_hi, acc[tt][2]);
      acc[tt][3] = fmaf(part[tt][3], sc_hi, acc[tt][3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) part[tt][e] = 0.f;
    }
  };

  // ldmatrix lane addresses: x4 loads token tiles (tt, tt+1) × k halves (lo, hi) = b0, b1 of tt, b0, b1 of
  // tt + 1; x2 (T = 1) only the first two.
  const uint32_t xs_base = smem_u32(xs);
  const int lrow = (T == 1 ? 0 : (lane >> 4) * 8) + (lane & 7);
  const uint32_t lane_off = uint32_t(lrow * XS + ((lane >> 3) & 1) * 8) * 2;
  uint32_t xs_chunk = xs_base + lane_off;

  // One k-step (16 columns): dequantize the lane's 8 codes, multiply by every token tile.
  auto kstep = [&](uint32_t w, uint32_t xaddr, int ks) {
    if constexpr (kGrouped) {
      if (ks == grp_next) {  // a new group starts: fold the last one, fetch the new one's scale and zero
        fold_group();
        ++grp;
        grp_next = grp >= p.groups - 1 ? INT_MAX : (grp + 1) * p.group_steps;
        const int slot = (chunk_buf * p.gmax + grp - chunk_g_lo) * kCtaRows + warp * 16 + g;
        sc_lo = ss[slot];
        sc_hi = ss[slot + 8];
        nz_lo = neg_zero_pair(zs[slot]);
        nz_hi = neg_zero_pair(zs[slot + 8]);
      }
    }
    uint32_t a[4];
    dequant_fragment(w, nz_lo, nz_hi, a);
    float(&dst)[T][4] = kGrouped ? part : acc;
    if constexpr (T == 1) {
      uint32_t b0, b1;
      ldmatrix_x2(xaddr, b0, b1);
      mma_bf16(dst[0], a, b0, b1);
    } else {
#pragma unroll
      for (int tt = 0; tt < T; tt += 2) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(xaddr + uint32_t(tt * 8 * XS * 2), b0, b1, b2, b3);
        mma_bf16(dst[tt], a, b0, b1);
        mma_bf16(dst[tt + 1], a, b2, b3);
      }
    }
  };

  for (int kb = kb0; kb < kb1; kb += P) {
    const uint4* wnext = wq + size_t(kb + P) * 32;  // k-blocks kb + P + i: immediate offsets from one base
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int b = kb + i;
      if (b < kb1) {  // CTA-uniform
        const int rel = b - kb0;
        if (i % XC == 0) {  // next x chunk (P % XC == 0): prefetch the one after it, wait for this one
          const int c = rel / XC;
          __syncthreads();  // every warp is done with chunk c − 1, whose buffer the prefetch reuses
          if (c + 1 < nchunks) stage_chunk(c + 1);
          cp_async_commit();
          cp_async_wait<1>();
          __syncthreads();
          chunk_buf = c & 1;
          xs_chunk = xs_base + lane_off + uint32_t(chunk_buf * kTok * XS * 2);
          if constexpr (kGrouped) chunk_g_lo = min((kb0 + c * XC) * kKBlock / p.group_size, p.groups - 1);
        }
        if (active) {
          const uint4 w = ring[i];
          if (b + P < kb1) ring[i] = ld_weights(wnext + i * 32, pol);
          const uint32_t xa = xs_chunk + uint32_t((i % XC) * kKBlock * 2);
          kstep(w.x, xa, 4 * b);
          kstep(w.y, xa + 32, 4 * b + 1);
          kstep(w.z, xa + 64, 4 * b + 2);
          kstep(w.w, xa + 96, 4 * b + 3);
        }
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (kGrouped) fold_group();
  if constexpr (kGrouped) sc_lo = sc_hi = 1.f;  // already applied per group

  auto store = [&]() {
    const float b_lo = (p.bias && r_lo < p.n) ? __bfloat162float(p.bias[r_lo]) : 0.f;
    const float b_hi = (p.bias && r_hi < p.n) ? __bfloat162float(p.bias[r_hi]) : 0.f;
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
      const int tok = tt * 8 + 2 * t;
      if (tok < p.m) {
        __nv_bfloat16* yr = p.y + size_t(tok) * p.n;
        if (r_lo < p.n) yr[r_lo] = __float2bfloat16_rn(fmaf(acc[tt][0], sc_lo, b_lo));
        if (r_hi < p.n) yr[r_hi] = __float2bfloat16_rn(fmaf(acc[tt][2], sc_hi, b_hi));
      }
      if (tok + 1 < p.m) {
        __nv_bfloat16* yr = p.y + size_t(tok + 1) * p.n;
        if (r_lo < p.n) yr[r_lo] = __float2bfloat16_rn(fmaf(acc[tt][1], sc_lo, b_lo));
        if (r_hi < p.n) yr[r_hi] = __float2bfloat16_rn(fmaf(acc[tt][3], sc_hi, b_hi));
      }
    }
  };

  if (p.splits == 1) {
    if (active) store();
    return;
  }

  // Split-K: publish this CTA's partial tile, then the last CTA of the row group reduces in split order.
  const size_t split_stride = size_t(kWarps) * T * 32;  // float4 per split of one row group
  float4* mine = reinterpret_cast<float4*>(p.partials) + (size_t(rg) * p.splits + split) * split_stride +
                 size_t(warp) * T * 32 + lane;
  if (active) {
#pragma unroll
    for (int tt = 0; tt < T; ++tt) __stcg(mine + tt * 32, make_float4(acc[tt][0], acc[tt][1], acc[tt][2], acc[tt][3]));
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const unsigned arrived = atomicAdd(p.counters + rg, 1u);
    s_last = arrived == unsigned(p.splits - 1);
    if (s_last) p.counters[rg] = 0;  // every other split has arrived: ready for the next GEMM
  }
  __syncthreads();
  if (!s_last || !active) return;
  __threadfence();
  const float4* all = reinterpret_cast<const float4*>(p.partials) + size_t(rg) * p.splits * split_stride +
                      size_t(warp) * T * 32 + lane;
#pragma unroll
  for (int tt = 0; tt < T; ++tt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[tt][e] = 0.f;
  for (int s = 0; s < p.splits; ++s) {
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
      const float4 v = __ldcg(all + s * split_stride + tt * 32);
      acc[tt][0] += v.x;
      acc[tt][1] += v.y;
      acc[tt][2] += v.z;
      acc[tt][3] += v.w;
    }
  }
  store();
}

// ------------------------------------------------------------------------------------------ decode kernel
// Small m (T <= 4 token tiles, m <= 32), one or several matrices that share x (grouped launch). CTA = 8 warps
// over R row tiles (R ∈ {1, 2, 4, 8}) × KS = 8 / R k-slices; a cluster of S CTAs (gridDim.y = S <= 8) splits
// k further, so the k-range is cut into KS · S slices of kbw k-blocks, one per warp. Each warp streams its
// slice with a ring of P 128-bit weight loads in flight, all issued before griddepcontrol.wait (weights do
// not depend on the previous kernel); then x rows [0, m) of the CTA's k-range are staged once (cp.async) and
// consumed by ldmatrix (rows >= m alias row 0: their token columns are computed and never stored).
// Reduction: each warp writes its scaled partial tile to shared memory; the KS warps of a tile are summed in
// warp order in shared memory; with S > 1 the S CTAs of the cluster are summed in rank order through
// distributed shared memory. No workspace, no atomics, deterministic.
constexpr int kDecMaxMats = 4;
constexpr int kDecMaxCluster = 8;
// k-blocks of weights in flight per warp (4 registers each), within the 128 registers of 2 CTAs per SM.
__host__ __device__ constexpr int dec_pipe(int T, bool grouped) { return T == 1 ? 16 : T == 2 ? (grouped ? 12 : 16) : 8; }

struct W4DecMat {
  const uint4* q;
  const float* scales;
  const uint16_t* zeros;
  const __nv_bfloat16* bias;  // [n] or null
  __nv_bfloat16* y;           // [m][n]
  int n, n_pad, n_tiles, group_size, groups, group_steps;
  int rg_begin;  // first blockIdx.x of this matrix
};

struct W4DecodeParams {
  W4DecMat mat[kDecMaxMats];
  const __nv_bfloat16* x;  // [m][k]
  int count, m, k, kblocks;
  int R, S, kbw;   // row tiles per CTA, CTAs per cluster (= gridDim.y), k-blocks per warp slice
  int xs_stride;   // bf16 elements per staged x row: (8 / R) · kbw · 64 + 8 (odd in 16-byte units)
  int gmax;        // group slots staged per CTA (grouped)
  int x_vec;       // x is 16-byte aligned and k % 8 == 0
};

// Dynamic shared memory of the decode kernel: red [8 warps][T][32] float4, cred [R·T][32] float4,
// scales [gmax][16R] fp32, zeros [gmax][16R] u16, x [m][xs_stride] bf16 (every part a multiple of 16 bytes).
__host__ __device__ constexpr size_t dec_smem_bytes(int T, int R, int gmax, int m, int xs_stride) {
  return size_t(kWarps) * T * 512 + size_t(R) * T * 512 + size_t(gmax) * R * 16 * 6 + size_t(m) * xs_stride * 2;
}

template <int T, bool kGrouped>
__global__ void __launch_bounds__(kThreads, 2) w4a16_decode_kernel(const __grid_constant__ W4DecodeParams p) {
  constexpr int P = dec_pipe(T, kGrouped);
  constexpr int NP = T == 1 ? 1 : T / 2;  // ldmatrix calls per k-step (x2 for T = 1, else x4 per 2 tiles)
  extern __shared__ __align__(16) unsigned char smem[];
  const int R = p.R, KS = kWarps / R;
  float4* red = reinterpret_cast<float4*>(smem);
  float4* cred = red + kWarps * T * 32;
  float* ss = reinterpret_cast<float*>(cred + R * T * 32);
  uint16_t* zs = reinterpret_cast<uint16_t*>(ss + p.gmax * R * 16);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(zs + p.gmax * R * 16);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  int mi = 0;
#pragma unroll
  for (int i = 1; i < kDecMaxMats; ++i)
    if (i < p.count && int(blockIdx.x) >= p.mat[i].rg_begin) mi = i;
  const W4DecMat& mt = p.mat[mi];
  const int rgl = int(blockIdx.x) - mt.rg_begin;
  const int rsub = warp % R, ks = warp / R;
  const int tile = rgl * R + rsub;
  const bool tile_ok = tile < mt.n_tiles;  // warp-uniform
  const int cta_kb0 = int(blockIdx.y) * KS * p.kbw;
  const int cta_kb1 = min(p.kblocks, cta_kb0 + KS * p.kbw);
  const int kb0 = cta_kb0 + ks * p.kbw;
  const int kb1 = min(cta_kb1, kb0 + p.kbw);
  const bool active = tile_ok && kb0 < kb1;  // warp-uniform
  const int r_lo = tile * 16 + g, r_hi = r_lo + 8;

  // 1. Weights (and their scales / zeros): independent of the previous kernel, in flight before the wait.
  const uint64_t pol = evict_first_policy();
  const uint4* wq = mt.q + size_t(active ? tile : 0) * p.kblocks * 32 + lane;
  uint4 ring[P];
#pragma unroll
  for (int i = 0; i < P; ++i)
    ring[i] = (active && kb0 + i < kb1) ? ld_weights(wq + size_t(kb0 + i) * 32, pol) : make_uint4(0, 0, 0, 0);

  uint32_t nz_lo = neg_zero_pair(0x4300u), nz_hi = nz_lo;
  float sc_lo = 0.f, sc_hi = 0.f;
  int cg_lo = 0;
  if constexpr (!kGrouped) {
    if (tile_ok) {
      nz_lo = neg_zero_pair(mt.zeros[r_lo]);
      nz_hi = neg_zero_pair(mt.zeros[r_hi]);
      sc_lo = mt.scales[r_lo];
      sc_hi = mt.scales[r_hi];
    }
  } else {
    if (cta_kb0 < cta_kb1) {  // the CTA's groups × its 16R rows (rows >= n_pad: zero-filled)
      cg_lo = min(cta_kb0 * kKBlock / mt.group_size, mt.groups - 1);
      const int cg_hi = min((cta_kb1 * kKBlock - 1) / mt.group_size, mt.groups - 1);
      const int ng = cg_hi - cg_lo + 1;  // <= gmax
      const int rows = R * 16, row0 = rgl * rows;
      for (int i = tid; i < ng * (rows / 4); i += kThreads) {
        const int gi = i / (rows / 4), rr = (i % (rows / 4)) * 4, row = row0 + rr;
        const bool ok = row < mt.n_pad;
        cp_async16(smem_u32(ss + gi * rows + rr), ok ? mt.scales + size_t(cg_lo + gi) * mt.n_pad + row : mt.scales,
                   ok);
      }
      for (int i = tid; i < ng * (rows / 8); i += kThreads) {
        const int gi = i / (rows / 8), rr = (i % (rows / 8)) * 8, row = row0 + rr;
        const bool ok = row < mt.n_pad;
        cp_async16(smem_u32(zs + gi * rows + rr), ok ? mt.zeros + size_t(cg_lo + gi) * mt.n_pad + row : mt.zeros,
                   ok);
      }
    }
    cp_async_commit();
  }

  // 2. Let the next kernel start its own weight prefetch; wait for the previous one (x, bias, y).
  pdl_launch_dependents();
  pdl_wait();

  float b_lo = 0.f, b_hi = 0.f;
  if (tile_ok && mt.bias) {
    if (r_lo < mt.n) b_lo = __bfloat162float(mt.bias[r_lo]);
    if (r_hi < mt.n) b_hi = __bfloat162float(mt.bias[r_hi]);
  }

  // 3. Stage x rows [0, m), columns [cta_kb0 · 64, cta_kb1 · 64) (zero beyond k).
  if (cta_kb0 < cta_kb1) {
    const int col0 = cta_kb0 * kKBlock;
    const int segs = (cta_kb1 - cta_kb0) * (kKBlock / 8);
    const int xlim = min(cta_kb1 * kKBlock, p.k);
    for (int i = tid; i < p.m * segs; i += kThreads) {
      const int r = i / segs, cs = i - r * segs;
      const int col = col0 + cs * 8;
      __nv_bfloat16* d = xs + r * p.xs_stride + cs * 8;
      if (p.x_vec) {
        const bool ok = col < xlim;  // k % 8 == 0: a segment is wholly inside or outside
        cp_async16(smem_u32(d), ok ? p.x + size_t(r) * p.k + col : p.x, ok);
      } else {
        uint32_t v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          uint32_t lo = 0, hi = 0;
          if (col + 2 * e < xlim) lo = __bfloat16_as_ushort(p.x[size_t(r) * p.k + col + 2 * e]);
          if (col + 2 * e + 1 < xlim) hi = __bfloat16_as_ushort(p.x[size_t(r) * p.k + col + 2 * e + 1]);
          v[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(d) = make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // ldmatrix lane addresses (see the general kernel), one per pair of token tiles; rows >= m read row 0.
  uint32_t xrow[NP];
  {
    const uint32_t xs_base = smem_u32(xs);
    const int lrow = (T == 1 ? 0 : (lane >> 4) * 8) + (lane & 7);
    const uint32_t kofs = uint32_t((lane >> 3) & 1) * 16;
#pragma unroll
    for (int pi = 0; pi < NP; ++pi) {
      const int row = pi * 16 + lrow;
      xrow[pi] = xs_base + uint32_t((row < p.m ? row : 0) * p.xs_stride * 2) + kofs;
    }
  }

  float acc[T][4];
  float part[T][4];
#pragma unroll
  for (int tt = 0; tt < T; ++tt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[tt][e] = part[tt][e] = 0.f;

  auto fold_group = [&]() {
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
      acc[tt][0] = fmaf(part[tt][0], sc_lo, acc[tt][0]);
      acc[tt][1] = fmaf(part[tt][1], sc_lo, acc[tt][1]);
      acc[tt][2] = fmaf(part[tt][2], sc_hi, acc[tt][2]);
      acc[tt][3] = fmaf(part[tt][3], sc_hi, acc[tt][3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) part[tt][e] = 0.f;
    }
  };

  int grp = 0, grp_next = INT_MAX;
  if constexpr (kGrouped) {
    grp = min(kb0 * kKBlock / mt.group_size, mt.groups - 1) - 1;
    grp_next = kb0 * 4;
  }

  auto kstep = [&](uint32_t w, uint32_t koff, int ksi) {
    if constexpr (kGrouped) {
      if (ksi == grp_next) {
        fold_group();
        ++grp;
        grp_next = grp >= mt.groups - 1 ? INT_MAX : (grp + 1) * mt.group_steps;
        const int slot = (grp - cg_lo) * (R * 16) + rsub * 16 + g;
        sc_lo = ss[slot];
        sc_hi = ss[slot + 8];
        nz_lo = neg_zero_pair(zs[slot]);
        nz_hi = neg_zero_pair(zs[slot + 8]);
      }
    }
    uint32_t a[4];
    dequant_fragment(w, nz_lo, nz_hi, a);
    float(&dst)[T][4] = kGrouped ? part : acc;
    if constexpr (T == 1) {
      uint32_t b0, b1;
      ldmatrix_x2(xrow[0] + koff, b0, b1);
      mma_bf16(dst[0], a, b0, b1);
    } else {
#pragma unroll
      for (int pi = 0; pi < NP; ++pi) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(xrow[pi] + koff, b0, b1, b2, b3);
        mma_bf16(dst[2 * pi], a, b0, b1);
        mma_bf16(dst[2 * pi + 1], a, b2, b3);
      }
    }
  };

  // 4. Stream the slice.
  if (active) {
    for (int kb = kb0; kb < kb1; kb += P) {
      const uint4* wnext = wq + size_t(kb + P) * 32;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int b = kb + i;
        if (b < kb1) {
          const uint4 w = ring[i];
          if (b + P < kb1) ring[i] = ld_weights(wnext + i * 32, pol);
          const uint32_t ko = uint32_t(b - cta_kb0) * (kKBlock * 2);
          kstep(w.x, ko, 4 * b);
          kstep(w.y, ko + 32, 4 * b + 1);
          kstep(w.z, ko + 64, 4 * b + 2);
          kstep(w.w, ko + 96, 4 * b + 3);
        }
      }
    }
    if constexpr (kGrouped) fold_group();
  }

  // 5. Reduction. Partials are already scaled (per channel: here; grouped: per group).
  if constexpr (kGrouped) sc_lo = sc_hi = 1.f;
#pragma unroll
  for (int tt = 0; tt < T; ++tt)
    red[(warp * T + tt) * 32 + lane] =
        make_float4(acc[tt][0] * sc_lo, acc[tt][1] * sc_lo, acc[tt][2] * sc_hi, acc[tt][3] * sc_hi);
  __syncthreads();

  auto store = [&](int tt, const float4& s) {
    const int tok = tt * 8 + 2 * t;
    if (tok < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok) * mt.n;
      if (r_lo < mt.n) yr[r_lo] = __float2bfloat16_rn(s.x + b_lo);
      if (r_hi < mt.n) yr[r_hi] = __float2bfloat16_rn(s.z + b_hi);
    }
    if (tok + 1 < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok + 1) * mt.n;
      if (r_lo < mt.n) yr[r_lo] = __float2bfloat16_rn(s.y + b_lo);
      if (r_hi < mt.n) yr[r_hi] = __float2bfloat16_rn(s.w + b_hi);
    }
  };

  // Level 1: token tile tt of tile rsub is summed over the CTA's KS warps (warp order) by warp (rsub, tt % KS).
  const int S = p.S;
  for (int tt = ks; tt < T; tt += KS) {
    float4 s = red[(rsub * T + tt) * 32 + lane];
    for (int q = 1; q < KS; ++q) {
      const float4 v = red[((q * R + rsub) * T + tt) * 32 + lane];
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    if (S == 1) {
      if (tile_ok) store(tt, s);
    } else {
      cred[(rsub * T + tt) * 32 + lane] = s;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Level 2: over the cluster's S CTAs (rank order) by warp (rsub, ·) of rank o / KS, o = tt mod (S · KS).
  if (S > 1) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's cred is written (release / acquire)
    const int o = int(cluster.block_rank()) * KS + ks, no = S * KS;
    for (int tt = o; tt < T; tt += no) {
      float4 v[kDecMaxCluster];
#pragma unroll
      for (int r = 0; r < kDecMaxCluster; ++r)
        if (r < S) v[r] = *cluster.map_shared_rank(cred + (rsub * T + tt) * 32 + lane, r);
      float4 s = v[0];
#pragma unroll
      for (int r = 1; r < kDecMaxCluster; ++r)
        if (r < S) {
          s.x += v[r].x;
          s.y += v[r].y;
          s.z += v[r].z;
          s.w += v[r].w;
        }
      if (tile_ok) store(tt, s);
    }
    cluster.sync();  // no CTA leaves while another still reads its shared memory
  }
#endif
}

// ------------------------------------------------------------------------------------------ reference kernel

__device__ int w4_code(const uint32_t* q, int kblocks, int r, int c) {
  const int tile = r / 16, kb = c / 64, j = (c % 64) / 16, rr = r % 16, cc = c % 16;
  const int lane = 4 * (rr % 8) + (cc % 8) / 2;
  const int i = rr / 8 + 2 * (cc / 8);
  const size_t word = ((size_t(tile) * kblocks + kb) * 32 + lane) * 4 + j;
  return int((q[word] >> (4 * i + 16 * (cc % 2))) & 15u);
}

// y[tok][r] = Σ_c (q − z) · s · x[tok][c] + bias[r], fp32; grid (ceil(n / 128), tokens).
__global__ void w4a16_reference_kernel(const __nv_bfloat16* x, const W4Device w, const __nv_bfloat16* bias,
                                       float* y) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  const int tok = blockIdx.y;
  if (r >= w.n) return;
  const __nv_bfloat16* xr = x + size_t(tok) * w.k;
  const int kblocks = w.k_pad / 64;
  float acc = 0.f;
  for (int c = 0; c < w.k; ++c) {
    const int grp = w.group_size > 0 ? min(c / w.group_size, w.groups - 1) : 0;
    const size_t gi = size_t(grp) * w.n_pad + r;
    const float z = __uint_as_float(uint32_t(w.zeros[gi]) << 16) - 128.f;
    const float wv = (float(w4_code(w.q, kblocks, r, c)) - z) * w.scales[gi];
    acc = fmaf(wv, __bfloat162float(xr[c]), acc);
  }
  if (bias) acc += __bfloat162float(bias[r]);
  y[size_t(tok) * w.n + r] = acc;
}

// ------------------------------------------------------------------------------------------ host side

int token_tiles(int m) {  // T for a launch of m <= 128 tokens
  const int tiles = (m + 7) / 8;
  return tiles <= 1 ? 1 : tiles <= 2 ? 2 : tiles <= 4 ? 4 : tiles <= 8 ? 8 : 16;
}

int gmax_for(int T, int group_size, int groups) {  // groups a staged chunk of XC k-blocks can touch
  if (groups <= 1) return 0;
  const int cols = chunk_kblocks(T) * kKBlock;
  return std::min(groups, (cols - 1) / group_size + 2);
}

size_t smem_bytes(int T, int gmax) {
  return size_t(2) * 8 * T * x_row_stride(T) * 2 + size_t(2) * gmax * kCtaRows * (4 + 2);
}

// Split-K CTAs are capped (so is the workspace): 4 per SM while weights bound the time, 2 when the mma does.
int split_cta_cap(int T, int sm_count) { return (T >= 8 ? 2 : 4) * std::max(sm_count, 1); }

// Workspace layout (the same for every launch, whatever its n: GEMMs of different shapes share one workspace):
// kCounterSlots arrival counters (one per 128-feature row group), then the fp32 partial sums. A launch with
// more row groups than counter slots does not split k (it has CTAs enough without).
constexpr int kCounterSlots = 1024;
constexpr size_t kCounterBytes = size_t(kCounterSlots) * 4;
size_t partial_bytes(int ctas, int T) { return size_t(ctas) * kWarps * T * 32 * 16; }

using KernelFn = void (*)(W4GemmParams);
using DecodeFn = void (*)(W4DecodeParams);

KernelFn kernel_for(int T, bool grouped) {
  switch (T) {
    case 1: return grouped ? w4a16_gemm_kernel<1, true> : w4a16_gemm_kernel<1, false>;
    case 2: return grouped ? w4a16_gemm_kernel<2, true> : w4a16_gemm_kernel<2, false>;
    case 4: return grouped ? w4a16_gemm_kernel<4, true> : w4a16_gemm_kernel<4, false>;
    case 8: return grouped ? w4a16_gemm_kernel<8, true> : w4a16_gemm_kernel<8, false>;
    default: return grouped ? w4a16_gemm_kernel<16, true> : w4a16_gemm_kernel<16, false>;
  }
}

DecodeFn decode_kernel_for(int T, bool grouped) {
  switch (T) {
    case 1: return grouped ? w4a16_decode_kernel<1, true> : w4a16_decode_kernel<1, false>;
    case 2: return grouped ? w4a16_decode_kernel<2, true> : w4a16_decode_kernel<2, false>;
    default: return grouped ? w4a16_decode_kernel<4, true> : w4a16_decode_kernel<4, false>;
  }
}

// Per-device facts, read once (host queries only: no sync, no stream work, so the first call may happen
// inside a graph capture). The first call on a device also raises every instance's dynamic shared-memory
// limit to the most it can ask for, so captures never meet a first use.
struct DeviceFacts {
  int device = -1;
  int major = 0;
  size_t smem_per_sm = 0, smem_optin = 0, smem_reserved = 0;
};

const DeviceFacts& device_facts() {
  static std::mutex mu;
  static std::deque<DeviceFacts> facts;  // references stay valid as devices are added
  int device = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  for (const DeviceFacts& f : facts)
    if (f.device == device) return f;
  DeviceFacts f;
  f.device = device;
  int v = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device));
  f.major = v;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  f.smem_per_sm = size_t(v);
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  f.smem_optin = size_t(v);
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrReservedSharedMemoryPerBlock, device));
  f.smem_reserved = size_t(v);
  for (int t = 1; t <= 16; t *= 2)
    for (bool g : {false, true}) {
      const size_t most = smem_bytes(t, g ? chunk_kblocks(t) * 4 + 1 : 0);
      SPEAR_CUDA_CHECK(cudaFuncSetAttribute(kernel_for(t, g), cudaFuncAttributeMaxDynamicSharedMemorySize, int(most)));
      if (t <= 4)
        SPEAR_CUDA_CHECK(cudaFuncSetAttribute(decode_kernel_for(t, g), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(f.smem_optin)));
    }
  facts.push_back(f);
  return facts.back();
}

// Resident CTAs per SM of a general-kernel instance for a shared-memory size (cached).
int ctas_per_sm(int T, bool grouped, size_t smem) {
  struct Entry {
    int device, T;
    bool grouped;
    size_t smem;
    int ctas;
  };
  const int device = device_facts().device;
  static std::mutex mu;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache)
    if (e.device == device && e.T == T && e.grouped == grouped && e.smem == smem) return e.ctas;
  int ctas = 0;
  SPEAR_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel_for(T, grouped), kThreads, smem));
  ctas = std::max(ctas, 1);
  cache.push_back({device, T, grouped, smem, ctas});
  return ctas;
}

// ---- options (process-wide; the defaults can be overridden by environment variables, read once)

std::mutex g_options_mu;
bool g_options_init = false;
W4GemmOptions g_options;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long r = std::strtol(v, &end, 10);
  return end && *end == 0 ? int(r) : fallback;
}

W4GemmOptions options_now() {
  std::lock_guard<std::mutex> lock(g_options_mu);
  if (!g_options_init) {
    g_options.pdl = env_int("SPEAR_W4_PDL", 1) != 0;
    g_options.path = std::clamp(env_int("SPEAR_W4_PATH", 0), 0, 2);
    g_options.decode_rows = env_int("SPEAR_W4_DECODE_ROWS", 0);
    g_options.decode_splits = env_int("SPEAR_W4_DECODE_SPLITS", 0);
    g_options_init = true;
  }
  return g_options;
}

// One launch with the optional cluster shape (1, cluster_y, 1) and programmatic stream serialization (PDL).
template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, size_t smem, int cluster_y, bool pdl, cudaStream_t stream,
            const Params& params) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (cluster_y > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = 1;
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

// Split-K plan: the number of splits that minimizes a simple time model, in k-blocks of one warp.
//  * T <= 4, weights bound: all resident CTAs share DRAM bandwidth, so time ~ waves × k-blocks per CTA, and
//    fewer resident CTAs than SMs leave bandwidth unused;
//  * T >= 8, mma bound: each SM is a server, time ~ ceil(CTAs / SMs) × k-blocks per CTA;
//  * a split costs its partial sums (write + read) and the serial reduction by the last CTA.
struct SplitPlan {
  int splits = 1, kb_per_split = 1;
};

SplitPlan plan_splits(int T, int row_groups, int kblocks, int sm_count, int resident_per_sm, size_t budget) {
  sm_count = std::max(sm_count, 1);
  auto cost = [&](int s, int kbps) {
    const long ctas = long(row_groups) * s;
    double c;
    if (T <= 4) {
      const long slots = long(sm_count) * resident_per_sm;
      const long waves = (ctas + slots - 1) / slots;
      const long resident = std::min(ctas, slots);
      c = double(waves) * kbps * std::max(1.0, double(sm_count) / double(resident));
    } else {
      c = double((ctas + sm_count - 1) / sm_count) * kbps;
    }
    if (s > 1) c += 0.5 * T + 3.0 + s / 8.0;
    return c;
  };
  SplitPlan best{1, std::max(kblocks, 1)};
  if (row_groups > kCounterSlots) return best;
  double best_cost = cost(1, best.kb_per_split);
  const int cap = split_cta_cap(T, sm_count);
  for (int s = 2; s <= kblocks; ++s) {
    const int kbps = (kblocks + s - 1) / s;
    const int se = (kblocks + kbps - 1) / kbps;  // splits actually non-empty
    if (se != s) continue;
    if (long(row_groups) * se > cap) break;
    if (kCounterBytes + partial_bytes(row_groups * se, T) > budget) break;
    const double c = cost(se, kbps);
    if (c < best_cost) {
      best_cost = c;
      best = {se, kbps};
    }
  }
  return best;
}

void check_device_weights(const W4Device& w) {
  SPEAR_CHECK(w.n > 0 && w.k > 0 && w.n_pad >= w.n && w.n_pad % 16 == 0 && w.k_pad >= w.k && w.k_pad % 64 == 0,
              "w4a16_gemm: bad sizes n {} k {} n_pad {} k_pad {}", w.n, w.k, w.n_pad, w.k_pad);
  const int expect_groups = w.group_size > 0 ? (w.k + w.group_size - 1) / w.group_size : 1;
  SPEAR_CHECK((w.group_size == -1 || (w.group_size > 0 && w.group_size % 16 == 0)) && w.groups == expect_groups,
              "w4a16_gemm: bad grouping (group_size {}, groups {} for k {})", w.group_size, w.groups, w.k);
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  SPEAR_CHECK(w.q && w.scales && w.zeros && aligned(w.q) && aligned(w.scales) && aligned(w.zeros),
              "w4a16_gemm: codes, scales and zeros must be 16-byte aligned device pointers");
}

// The general kernel (any m <= 128, split-K through the workspace).
void launch_general(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias, __nv_bfloat16* y,
                    void* workspace, size_t workspace_bytes, int sm_count, bool pdl, cudaStream_t stream) {
  const int T = token_tiles(m);
  const bool grouped = w.groups > 1;
  W4GemmParams p{};
  p.x = x;
  p.y = y;
  p.bias = bias;
  p.q = reinterpret_cast<const uint4*>(w.q);
  p.scales = w.scales;
  p.zeros = w.zeros;
  p.m = m;
  p.n = w.n;
  p.k = w.k;
  p.n_pad = w.n_pad;
  p.n_tiles = w.n_pad / 16;
  p.kblocks = w.k_pad / kKBlock;
  p.group_size = grouped ? w.group_size : 0;
  p.groups = w.groups;
  p.group_steps = grouped ? w.group_size / 16 : 0;
  p.gmax = gmax_for(T, w.group_size, w.groups);
  p.x_vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0 && w.k % 8 == 0;
  const int row_groups = (p.n_tiles + kWarps - 1) / kWarps;
  const size_t smem = smem_bytes(T, p.gmax);
  const int resident = ctas_per_sm(T, grouped, smem);
  const size_t budget = workspace ? workspace_bytes : 0;
  const SplitPlan plan = plan_splits(T, row_groups, p.kblocks, sm_count, resident, budget);
  p.splits = plan.splits;
  p.kb_per_split = plan.kb_per_split;
  if (p.splits > 1) {
    p.counters = static_cast<unsigned*>(workspace);
    p.partials = reinterpret_cast<float*>(static_cast<char*>(workspace) + kCounterBytes);
  }
  launch(kernel_for(T, grouped), dim3(row_groups, p.splits), smem, 1, pdl, stream, p);
}

// ---- decode plan: tiles per CTA R and cluster size S from a small time model (µs) of one launch:
//   waves × (latency + max(bytes / bandwidth, issue time, serial latency of a slice longer than the ring))
//   + x staging + the reductions (shared memory; cluster barriers and DSMEM when S > 1).
// The constants are rough H100/H200 figures; the choice only needs to be near the best, not exact.
struct DecodePlan {
  int R = 0, S = 0, kbw = 0, xs_stride = 0, gmax = 0;
  size_t smem = 0;
  double cost = 1e300;
};

DecodePlan plan_decode(int T, int m, const W4Device* w, int count, int sm_count, const W4GemmOptions& o) {
  const DeviceFacts& dev = device_facts();
  sm_count = std::max(sm_count, 1);
  const int kblocks = w[0].k_pad / kKBlock;
  const int max_s = dev.major >= 9 ? kDecMaxCluster : 1;
  long units = 0;  // 16 × 64 weight tiles of 512 bytes
  for (int i = 0; i < count; ++i) units += long(w[i].n_pad / 16) * kblocks;
  const double bytes = double(units) * 512.0;
  constexpr double kLatency = 0.8;       // DRAM round trip under load
  constexpr double kBandwidth = 3.2e6;   // bytes / µs, whole device
  constexpr double kSmBandwidth = 45e3;  // bytes / µs one SM can pull with a few CTAs of loads in flight
  constexpr double kSmL2 = 60e3;         // bytes / µs of x staging per SM (L2 → shared memory)
  constexpr double kIssue = 7000.0;      // warp instructions / µs / SM
  const int P = dec_pipe(T, count > 0 && w[0].groups > 1);

  DecodePlan best;
  for (int R : {8, 4, 2, 1}) {
    if (o.decode_rows && R != o.decode_rows) continue;
    const int KS = kWarps / R;
    long ctas_x = 0;
    for (int i = 0; i < count; ++i) ctas_x += (w[i].n_pad / 16 + R - 1) / R;
    for (int S = 1; S <= max_s; ++S) {
      if (o.decode_splits && S != std::min(o.decode_splits, max_s)) continue;
      const int KT = KS * S;
      const int kbw = (kblocks + KT - 1) / KT;
      const bool forced = o.decode_rows || o.decode_splits;
      if (!forced && S > 1 && (S - 1) * KS * kbw >= kblocks) continue;  // a CTA without k-blocks
      const int cta_cols = KS * kbw * kKBlock;
      int gmax = 0;
      for (int i = 0; i < count; ++i)
        if (w[i].groups > 1) gmax = std::max(gmax, std::min(w[i].groups, (cta_cols - 1) / w[i].group_size + 2));
      const int xs_stride = cta_cols + 8;
      const size_t smem = dec_smem_bytes(T, R, gmax, m, xs_stride);
      if (smem > dev.smem_optin) continue;
      const int resident =
          std::min<int>(2, int(dev.smem_per_sm / std::max<size_t>(smem + dev.smem_reserved, 1)));
      if (resident < 1) continue;
      const long ctas = ctas_x * S;
      const long slots = long(sm_count) * resident;
      const long waves = (ctas + slots - 1) / slots;
      const long in_wave = std::min(ctas, slots);
      const long sms_used = std::min<long>(in_wave, sm_count);
      const long ctas_per_sm = (in_wave + sm_count - 1) / sm_count;
      const double bw = std::min(kBandwidth, double(sms_used) * kSmBandwidth);
      const double stream = bytes / double(waves) / bw;
      const double issue = double(ctas_per_sm) * kWarps * kbw * 4.0 * (12.0 + 1.5 * T) / kIssue;
      const double serial = double((kbw + P - 1) / P - 1) * kLatency;
      double cost = double(waves) * (kLatency + std::max({stream, issue, serial}));
      cost += 0.7 * double(ctas_per_sm) * double(m) * cta_cols * 2.0 / kSmL2;  // partly under the weight loads
      if (KS > 1) cost += 0.05 + 0.01 * KS;
      if (S > 1) cost += 0.3 + 0.03 * S;
      if (cost < best.cost) best = {R, S, kbw, xs_stride, gmax, smem, cost};
    }
  }
  return best;
}

// The decode kernel over count matrices sharing x; false when no plan fits (the caller takes the general path).
bool launch_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                   __nv_bfloat16* const* y, int sm_count, const W4GemmOptions& o, cudaStream_t stream) {
  const int T = token_tiles(m);
  if (T > 4 || count < 1 || count > kDecMaxMats) return false;
  const bool grouped = w[0].groups > 1;
  for (int i = 1; i < count; ++i)
    if ((w[i].groups > 1) != grouped || w[i].k_pad != w[0].k_pad || w[i].k != w[0].k) return false;
  DecodePlan plan = plan_decode(T, m, w, count, sm_count, o);
  if (plan.R == 0 && (o.decode_rows || o.decode_splits)) {  // a forced plan that does not fit: the planner's own
    W4GemmOptions free = o;
    free.decode_rows = free.decode_splits = 0;
    plan = plan_decode(T, m, w, count, sm_count, free);
  }
  if (plan.R == 0) return false;
  W4DecodeParams p{};
  int rg = 0;
  for (int i = 0; i < count; ++i) {
    W4DecMat& d = p.mat[i];
    d.q = reinterpret_cast<const uint4*>(w[i].q);
    d.scales = w[i].scales;
    d.zeros = w[i].zeros;
    d.bias = bias ? bias[i] : nullptr;
    d.y = y[i];
    d.n = w[i].n;
    d.n_pad = w[i].n_pad;
    d.n_tiles = w[i].n_pad / 16;
    d.group_size = grouped ? w[i].group_size : 0;
    d.groups = w[i].groups;
    d.group_steps = grouped ? w[i].group_size / 16 : 0;
    d.rg_begin = rg;
    rg += (d.n_tiles + plan.R - 1) / plan.R;
  }
  p.x = x;
  p.count = count;
  p.m = m;
  p.k = w[0].k;
  p.kblocks = w[0].k_pad / kKBlock;
  p.R = plan.R;
  p.S = plan.S;
  p.kbw = plan.kbw;
  p.xs_stride = plan.xs_stride;
  p.gmax = plan.gmax;
  p.x_vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0 && w[0].k % 8 == 0;
  const bool pdl = o.pdl && device_facts().major >= 9;
  launch(decode_kernel_for(T, grouped), dim3(rg, plan.S), plan.smem, plan.S, pdl, stream, p);
  return true;
}

void check_gemm_args(const __nv_bfloat16* x, const void* workspace) {
  SPEAR_CHECK(x, "w4a16_gemm: null x");
  SPEAR_CHECK((reinterpret_cast<uintptr_t>(workspace) & 15) == 0, "w4a16_gemm: workspace must be 16-byte aligned");
}

}  // namespace

void w4a16_set_options(const W4GemmOptions& o) {
  SPEAR_CHECK(o.path >= 0 && o.path <= 2, "w4a16_set_options: path must be 0, 1 or 2, got {}", o.path);
  SPEAR_CHECK(o.decode_rows == 0 || o.decode_rows == 1 || o.decode_rows == 2 || o.decode_rows == 4 ||
                  o.decode_rows == 8,
              "w4a16_set_options: decode_rows must be 0, 1, 2, 4 or 8, got {}", o.decode_rows);
  SPEAR_CHECK(o.decode_splits >= 0 && o.decode_splits <= kDecMaxCluster,
              "w4a16_set_options: decode_splits must be 0..{}, got {}", kDecMaxCluster, o.decode_splits);
  options_now();  // the environment is read first, so a later first use cannot overwrite o
  std::lock_guard<std::mutex> lock(g_options_mu);
  g_options = o;
}

W4GemmOptions w4a16_get_options() { return options_now(); }

size_t w4a16_workspace_bytes(int max_m, int max_n, int max_k, int sm_count) {
  const int row_groups = ((std::max(max_n, 1) + 15) / 16 + kWarps - 1) / kWarps;
  const long kblocks = (std::max(max_k, 1) + kKBlock - 1) / kKBlock;
  const int t_max = token_tiles(std::clamp(max_m, 1, kMaxTokens));
  size_t partial = 0;
  for (int T = 1; T <= t_max; T *= 2) {
    const long ctas = std::min(long(row_groups) * kblocks, long(split_cta_cap(T, sm_count)));
    partial = std::max(partial, partial_bytes(int(ctas), T));
  }
  return kCounterBytes + partial;
}

void w4a16_gemm(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias, __nv_bfloat16* y,
                void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  if (m <= 0) return;
  check_device_weights(w);
  check_gemm_args(x, workspace);
  SPEAR_CHECK(y, "w4a16_gemm: null y");
  const W4GemmOptions o = options_now();
  const bool pdl = o.pdl && device_facts().major >= 9;
  if (o.path != 2 && m <= kDecMaxTokens && launch_decode(x, m, &w, 1, &bias, &y, sm_count, o, stream)) return;
  for (int m0 = 0; m0 < m; m0 += kMaxTokens) {
    const int mc = std::min(kMaxTokens, m - m0);
    launch_general(x + size_t(m0) * w.k, mc, w, bias, y + size_t(m0) * w.n, workspace, workspace_bytes, sm_count,
                   pdl, stream);
  }
}

void w4a16_gemm_grouped(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                        const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, void* workspace,
                        size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  SPEAR_CHECK(count >= 0 && count <= kW4MaxGrouped, "w4a16_gemm_grouped: count {} (at most {})", count,
              kW4MaxGrouped);
  if (m <= 0 || count == 0) return;
  SPEAR_CHECK(w && y, "w4a16_gemm_grouped: null matrix or output array");
  check_gemm_args(x, workspace);
  for (int i = 0; i < count; ++i) {
    check_device_weights(w[i]);
    SPEAR_CHECK(y[i], "w4a16_gemm_grouped: null y[{}]", i);
    SPEAR_CHECK(w[i].k == w[0].k, "w4a16_gemm_grouped: matrix {} has k {}, matrix 0 has k {}", i, w[i].k, w[0].k);
  }
  const W4GemmOptions o = options_now();
  if (o.path != 2 && m <= kDecMaxTokens && launch_decode(x, m, w, count, bias, y, sm_count, o, stream)) return;
  // Larger m (or mixed per-channel / grouped matrices): one GEMM after the other (same workspace, stream order).
  for (int i = 0; i < count; ++i)
    w4a16_gemm(x, m, w[i], bias ? bias[i] : nullptr, y[i], workspace, workspace_bytes, sm_count, stream);
}

void w4a16_gemm_reference(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias, float* y,
                          cudaStream_t stream) {
  if (m <= 0) return;
  check_device_weights(w);
  constexpr int kRefThreads = 128;
  constexpr int kMaxGridY = 65535;
  for (int m0 = 0; m0 < m; m0 += kMaxGridY) {
    const int mc = std::min(kMaxGridY, m - m0);
    const dim3 grid((w.n + kRefThreads - 1) / kRefThreads, mc);
    w4a16_reference_kernel<<<grid, kRefThreads, 0, stream>>>(x + size_t(m0) * w.k, w, bias, y + size_t(m0) * w.n);
    SPEAR_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace spear::cuda
