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
//  * decode kernel (m <= 32, also grouped launches of up to 4 matrices sharing x): w4a16_decode.cu;
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
//
// ---- Files
// w4a16_common.cuh: constants and device helpers of both kernels; w4a16_internal.h: host functions shared
// with w4a16_decode.cu (device facts, launch, the decode launcher). This file: the general kernel, its split-K
// planner, the options, the workspace size, the reference kernel and the public entry points.
#include "backend/cuda/w4a16_gemm.h"

#include <algorithm>
#include <climits>
#include <deque>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_ec.cuh"
#include "backend/cuda/w4a16_fusion.cuh"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda {

using namespace w4_detail;

namespace {

constexpr int kMaxTokens = 128;            // tokens per launch: 16 mma tiles of 8


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

// ------------------------------------------------------------------------------------------ general kernel

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
      stage_x_segment(dst + r * XS + cs * 8, p.x, p.k, r, col, xlim, r < p.m, p.x_vec);
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
  fill_weight_ring(ring, wq, kb0, kb1, active, pol);
  // PDL: the weights above do not depend on the previous kernel; x, bias, y and the workspace do.
  pdl_launch_dependents();
  pdl_wait();
  if (kb0 < kb1) stage_chunk(0);
  cp_async_commit();

  // Zero points (as bf16x2 pairs of −(128 + z)) and scales of rows r_lo / r_hi.
  uint32_t nz_lo = neg_zero_pair(0x4300u), nz_hi = nz_lo;
  float sc_lo = 0.f, sc_hi = 0.f;
  if constexpr (!kGrouped) {
    if (active) load_channel_params(p.scales, p.zeros, r_lo, r_hi, nz_lo, nz_hi, sc_lo, sc_hi);
  }
  // Grouped: the group of the current k-step and the first k-step of the next one (start_groups).
  int grp = 0, grp_next = INT_MAX, chunk_g_lo = 0, chunk_buf = 0;
  if constexpr (kGrouped) start_groups(kb0, p.group_size, p.groups, grp, grp_next);

  float acc[T][4];   // totals: rows (g, g, g+8, g+8) × tokens (2t, 2t+1, 2t, 2t+1) of each token tile
  float part[T][4];  // grouped: the current group's sums
  zero_accumulators(acc, part);
  auto fold = [&]() { fold_group(acc, part, sc_lo, sc_hi); };  // (a lambda keeps the codegen as before)

  // ldmatrix lane addresses: x4 loads token tiles (tt, tt+1) × k halves (lo, hi) = b0, b1 of tt, b0, b1 of
  // tt + 1; x2 (T = 1) only the first two.
  const uint32_t xs_base = smem_u32(xs);
  const int lrow = ldmatrix_row<T>(lane);
  const uint32_t lane_off = uint32_t(lrow * XS + ((lane >> 3) & 1) * 8) * 2;
  uint32_t xs_chunk = xs_base + lane_off;

  // One k-step (16 columns): dequantize the lane's 8 codes, multiply by every token tile.
  auto kstep = [&](uint32_t w, uint32_t xaddr, int ks) {
    if constexpr (kGrouped) {
      if (ks == grp_next) {  // a new group starts: fold the last one, fetch the new one's scale and zero
        fold();
        advance_group(grp, grp_next, p.groups, p.group_steps);
        const int slot = (chunk_buf * p.gmax + grp - chunk_g_lo) * kCtaRows + warp * 16 + g;
        load_group_params(ss, zs, slot, sc_lo, sc_hi, nz_lo, nz_hi);
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
          // Consume the slot, then refill it: the load then writes the slot's own registers. Loading first
          // (while the old codes are still needed) made the compiler load into a temporary and copy it back,
          // which waits for the load: one DRAM round trip per k-block instead of P in flight.
          const uint32_t xa = xs_chunk + uint32_t((i % XC) * kKBlock * 2);
          kblock_steps(ring[i], xa, b, kstep);
          if (b + P < kb1) ring[i] = ld_weights(wnext + i * 32, pol);
        }
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (kGrouped) fold();
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

KernelFn kernel_for(int T, bool grouped) {
  switch (T) {
    case 1: return grouped ? w4a16_gemm_kernel<1, true> : w4a16_gemm_kernel<1, false>;
    case 2: return grouped ? w4a16_gemm_kernel<2, true> : w4a16_gemm_kernel<2, false>;
    case 4: return grouped ? w4a16_gemm_kernel<4, true> : w4a16_gemm_kernel<4, false>;
    case 8: return grouped ? w4a16_gemm_kernel<8, true> : w4a16_gemm_kernel<8, false>;
    default: return grouped ? w4a16_gemm_kernel<16, true> : w4a16_gemm_kernel<16, false>;
  }
}

}  // namespace

namespace w4_detail {

int token_tiles(int m) {  // T for a launch of m <= 128 tokens
  const int tiles = (m + 7) / 8;
  return tiles <= 1 ? 1 : tiles <= 2 ? 2 : tiles <= 4 ? 4 : tiles <= 8 ? 8 : 16;
}

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
      if (t <= 4) set_decode_max_smem(t, g, int(f.smem_optin));
    }
  if (f.major >= 9) {
    set_bulk_max_smem(int(f.smem_optin));
    set_mlp_fused_max_smem(int(f.smem_optin));
  }
  facts.push_back(f);
  return facts.back();
}

}  // namespace w4_detail

namespace {

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

}  // namespace

// (w4a16_internal.h)
namespace w4_detail {

W4GemmOptions options_now() {
  std::lock_guard<std::mutex> lock(g_options_mu);
  if (!g_options_init) {
    g_options.pdl = env_int("SPEAR_W4_PDL", 1) != 0;
    g_options.path = std::clamp(env_int("SPEAR_W4_PATH", 0), 0, 2);
    g_options.decode_rows = env_int("SPEAR_W4_DECODE_ROWS", 0);
    g_options.decode_splits = env_int("SPEAR_W4_DECODE_SPLITS", 0);
    g_options.bulk = env_int("SPEAR_W4_BULK", 1) != 0;
    g_options.bulk_min_blocks = std::clamp(env_int("SPEAR_W4_BULK_OCC", 0), 0, 4);
    g_options.ec_gate = std::clamp(env_int("SPEAR_W4_EC_GATE", 0), 0, 5);
    g_options_init = true;
  }
  return g_options;
}

}  // namespace w4_detail

namespace {

// One launch with the optional cluster shape (1, cluster_y, 1) and programmatic stream serialization (PDL).
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

}  // namespace

// (w4a16_internal.h)
namespace w4_detail {

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

void check_launch_members(const char* who, const W4Device* w, int count, __nv_bfloat16* const* y,
                          const W4EcDevice* const* ec) {
  for (int i = 0; i < count; ++i) {
    check_device_weights(w[i]);
    SPEAR_CHECK(y[i], "{}: null y[{}]", who, i);
    if (ec && ec[i])
      SPEAR_CHECK(ec[i]->rank >= 1 && ec[i]->A && ec[i]->B && ec[i]->scratch,
                  "{}: compensator {} has rank {} or a null A, B or scratch", who, i, ec[i]->rank);
  }
}

}  // namespace w4_detail

namespace {

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

void check_gemm_args(const __nv_bfloat16* x, const void* workspace) {
  SPEAR_CHECK(x, "w4a16_gemm: null x");
  SPEAR_CHECK((reinterpret_cast<uintptr_t>(workspace) & 15) == 0, "w4a16_gemm: workspace must be 16-byte aligned");
}

}  // namespace

void w4a16_set_options(const W4GemmOptions& o) {
  SPEAR_CHECK(o.path >= 0 && o.path <= 2, "w4a16_set_options: path must be 0, 1 or 2, got {}", o.path);
  SPEAR_CHECK(o.decode_rows == -1 || o.decode_rows == 0 || o.decode_rows == 1 || o.decode_rows == 2 ||
                  o.decode_rows == 4 || o.decode_rows == 8,
              "w4a16_set_options: decode_rows must be -1 (bulk-copy kernel), 0, 1, 2, 4 or 8, got {}", o.decode_rows);
  SPEAR_CHECK(o.decode_splits >= 0 && o.decode_splits <= kDecMaxCluster,
              "w4a16_set_options: decode_splits must be 0..{}, got {}", kDecMaxCluster, o.decode_splits);
  SPEAR_CHECK(o.bulk_min_blocks >= 0 && o.bulk_min_blocks <= 4,
              "w4a16_set_options: bulk_min_blocks must be 0..4, got {}", o.bulk_min_blocks);
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
  bool general = false;  // a tuned kGeneralPlan, or no decode plan: the general kernel below either way
  if (o.path != 2 && m <= kDecMaxTokens && launch_decode(x, m, &w, 1, &bias, &y, sm_count, o, stream, &general))
    return;
  for (int m0 = 0; m0 < m; m0 += kMaxTokens) {
    const int mc = std::min(kMaxTokens, m - m0);
    launch_general(x + size_t(m0) * w.k, mc, w, bias, y + size_t(m0) * w.n, workspace, workspace_bytes, sm_count,
                   pdl, stream);
  }
}

bool w4a16_gemm_mirrored(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias,
                         __nv_bfloat16* y, const W4PeerMirror& mirror, int sm_count, cudaStream_t stream) {
  if (m <= 0) return false;
  check_device_weights(w);
  SPEAR_CHECK(x && y, "w4a16_gemm_mirrored: null x or y");
  SPEAR_CHECK(mirror.ranks >= 2 && mirror.ranks <= kW4MirrorMaxRanks && mirror.rank >= 0 &&
                  mirror.rank < mirror.ranks && mirror.epoch && mirror.max_rows >= 1 &&
                  mirror.slot_bytes >= int64_t(w.n) * 4 && mirror.slot_bytes % 16 == 0,
              "w4a16_gemm_mirrored: bad mirror ({} ranks, rank {}, {} rows, slot {} bytes for n {})", mirror.ranks,
              mirror.rank, mirror.max_rows, mirror.slot_bytes, w.n);
  for (int q = 0; q < mirror.ranks; ++q)
    SPEAR_CHECK(mirror.staging[q], "w4a16_gemm_mirrored: rank {}'s staging missing", q);
  const W4GemmOptions o = options_now();
  if (o.path == 2 || m > kDecMaxTokens) return false;
  return launch_decode_mirrored(x, m, w, bias, y, mirror, sm_count, o, stream);
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
  bool general = false;
  if (o.path != 2 && m <= kDecMaxTokens && launch_decode(x, m, w, count, bias, y, sm_count, o, stream, &general))
    return;
  if (general) {  // tuned: the general kernel beats the decode plans for this launch (one launch per matrix)
    const bool pdl = o.pdl && device_facts().major >= 9;
    for (int i = 0; i < count; ++i)
      launch_general(x, m, w[i], bias ? bias[i] : nullptr, y[i], workspace, workspace_bytes, sm_count, pdl, stream);
    return;
  }
  // Larger m (or mixed per-channel / grouped matrices): one GEMM after the other (same workspace, stream order).
  for (int i = 0; i < count; ++i)
    w4a16_gemm(x, m, w[i], bias ? bias[i] : nullptr, y[i], workspace, workspace_bytes, sm_count, stream);
}

size_t w4a16_fusion_counter_bytes() { return kFusedCounterBytes; }

bool w4a16_fusable(int m, const W4Device* w, int count, const W4Fusion& f, __nv_bfloat16* const* y,
                   const W4EcDevice* const* ec) {
  return m >= 1 && count >= 1 && count <= kW4MaxGrouped && w && y && decode_fusable(m, w, count, f, y, ec);
}

bool w4a16_gemm_fused(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4Fusion& f,
                      const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count, cudaStream_t stream,
                      const W4EcDevice* const* ec) {
  SPEAR_CHECK(count >= 1 && count <= kW4MaxGrouped, "w4a16_gemm_fused: count {} (1..{})", count, kW4MaxGrouped);
  SPEAR_CHECK(w && y && x, "w4a16_gemm_fused: null x, matrix or output array");
  check_launch_members("w4a16_gemm_fused", w, count, y, ec);
  const W4GemmOptions o = options_now();
  if (o.path == 2 || !w4a16_fusable(m, w, count, f, y, ec)) return false;
  return launch_decode_fused(x, m, w, count, f, bias, y, sm_count, o, stream, ec);
}

bool w4a16_tune_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y,
                       void* flush, size_t flush_bytes, int sm_count, cudaStream_t stream, int reps,
                       const W4EcDevice* const* ec, const W4Fusion* fusion, const std::function<void()>* before,
                       void* workspace, size_t workspace_bytes) {
  SPEAR_CHECK(count >= 1 && count <= kW4MaxGrouped, "w4a16_tune_decode: count {} (1..{})", count, kW4MaxGrouped);
  SPEAR_CHECK(w && y && x, "w4a16_tune_decode: null x, matrix or output array");
  SPEAR_CHECK(reps >= 1, "w4a16_tune_decode: reps must be >= 1");
  for (int i = 0; i < count; ++i) {
    check_device_weights(w[i]);
    SPEAR_CHECK(y[i], "w4a16_tune_decode: null y[{}]", i);
  }
  if (m <= 0) return false;
  if (fusion && (fusion->residual || !w4a16_fusable(m, w, count, *fusion, y, ec))) fusion = nullptr;
  check_gemm_args(x, workspace);
  // The general kernel as w4a16_gemm_grouped runs it for a tuned kGeneralPlan (one launch per matrix, no bias: the
  // timing does not depend on it).
  std::function<void()> general;
  if (workspace && m <= kMaxTokens) {
    const bool pdl = options_now().pdl && device_facts().major >= 9;
    general = [=] {
      for (int i = 0; i < count; ++i)
        launch_general(x, m, w[i], nullptr, y[i], workspace, workspace_bytes, sm_count, pdl, stream);
    };
  }
  return tune_decode(x, m, w, count, y, flush, flush ? flush_bytes : 0, sm_count, stream, reps, ec, fusion,
                     before && *before ? before : nullptr, general ? &general : nullptr);
}

bool w4a16_decode_tuned(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  return m <= 0 || count < 1 || count > kW4MaxGrouped || decode_tuned(m, w, count, ec);
}

void w4a16_clear_tuning() { clear_tuning(); }

std::pair<int, int> w4a16_decode_plan(int m, const W4Device* w, int count, int sm_count) {
  if (m <= 0 || !w || count < 1 || count > kW4MaxGrouped) return {0, 0};
  const W4GemmOptions o = options_now();
  if (o.path == 2) return {0, 0};
  return decode_plan(m, w, count, sm_count);
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