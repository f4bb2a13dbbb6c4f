// W4A16 decode kernel (m <= 32, also grouped launches of up to 4 matrices sharing x), its planner and its
// launcher; built for latency: weights in flight before griddepcontrol.wait (PDL), x staged once, split-K
// reduced in shared memory and across a thread-block cluster through distributed shared memory (no workspace).
// The code layout, the dequantization and the general kernel are described in w4a16_gemm.cu; the device
// helpers both kernels share are in w4a16_common.cuh.
//
// Small m (T <= 4 token tiles, m <= 32), one or several matrices that share x (grouped launch). CTA = 8 warps
// over R row tiles (R ∈ {1, 2, 4, 8}) × KS = 8 / R k-slices; a cluster of S CTAs (gridDim.y = S <= 8) splits
// k further, so the k-range is cut into KS · S slices of kbw k-blocks, one per warp. Each warp streams its
// slice with a ring of P 128-bit weight loads in flight, all issued before griddepcontrol.wait (weights do
// not depend on the previous kernel); then x rows [0, m) of the CTA's k-range are staged once (cp.async) and
// consumed by ldmatrix (rows >= m alias row 0: their token columns are computed and never stored).
// Reduction: each warp writes its scaled partial tile to shared memory; the KS warps of a tile are summed in
// warp order in shared memory; with S > 1 the S CTAs of the cluster are summed in rank order through
// distributed shared memory. No workspace, no atomics, deterministic.
#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include <cooperative_groups.h>

#include "backend/cuda/peer_sync.cuh"
#include "backend/cuda/w4a16_ec.cuh"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda::w4_detail {

namespace {

namespace cg = cooperative_groups;

constexpr int kDecMaxMats = 4;
// Static shared memory of the decode kernel (the fused EC's flags) comes off the opt-in limit: plans
// keep this margin below it (plan_decode), the instances' dynamic limit is the rest.
constexpr int kDecStaticSmemMargin = 2048;
// k-blocks of weights in flight per warp (4 registers each), within the 128 registers of 2 CTAs per SM.
// (8 measured faster than 16 on the H200 for T = 1 and 2 once the ring refills in place: dev/cuda/w4_stream_lab.cu.)
__host__ __device__ constexpr int dec_pipe(int, bool) { return 8; }
// CTAs per SM the registers allow (launch bounds): three for per-channel T <= 2, so that 24 warps hide the load
// latency (80 registers suffice); two otherwise (the grouped instances spill at 80).
__host__ __device__ constexpr int dec_min_blocks(int T, bool grouped) { return T <= 2 && !grouped ? 3 : 2; }

struct W4DecMat {
  const uint4* q;
  const float* scales;
  const uint16_t* zeros;
  const __nv_bfloat16* bias;  // [n] or null
  __nv_bfloat16* y;           // [m][n]
  int n, n_pad, n_tiles, group_size, groups, group_steps;
  int rg_begin;  // first blockIdx.x of this matrix
  int has_ec;    // ec is set (w4a16_ec.cuh)
  W4DecEc ec;
};

struct W4DecodeParams {
  W4DecMat mat[kDecMaxMats];
  const __nv_bfloat16* x;  // [m][k]
  int count, m, k, kblocks;
  int R, S, kbw;   // row tiles per CTA, CTAs per cluster (= gridDim.y), k-blocks per warp slice
  int xs_stride;   // bf16 elements per staged x row: (8 / R) · kbw · 64 + 8 (odd in 16-byte units)
  int gmax;        // group slots staged per CTA (grouped)
  int x_vec;       // x is 16-byte aligned and k % 8 == 0
  // Fused compensators (w4a16_ec.cuh): blockIdx.x < ec_cols are EC CTAs (the W4 CTAs follow); done counts
  // finished CTAs (in the first EC's scratch). ec_rmax / ec_gmax: the largest rank / gate width (shared memory).
  unsigned* done;
  int ec_cols, ec_rmax, ec_gmax;
  W4PeerMirror mirror;  // P2P dual-write of the output (count 1; ranks <= 1: none)
};

// Dynamic shared memory of the decode kernel: red [8 warps][T][32] float4, cred [R·T][32] float4,
// scales [gmax][16R] fp32, zeros [gmax][16R] u16, x [m][xs_stride] bf16, with fused ECs B rows [16R][rank] bf16,
// g ⊙ z and z [m][rank] fp32 and the gate's hidden [m][gate width (a multiple of 4)] fp32 (every part a
// multiple of 16 bytes). EC CTAs use the start of the same space for their z partials [rank][m].
__host__ __device__ constexpr size_t dec_smem_bytes(int T, int R, int gmax, int m, int xs_stride, int ec_rmax,
                                                    int ec_gmax) {
  return size_t(kWarps) * T * 512 + size_t(R) * T * 512 + size_t(gmax) * R * 16 * 6 + size_t(m) * xs_stride * 2 +
         size_t(R) * 16 * ec_rmax * 2 + size_t(m) * ec_rmax * 8 + size_t(m) * ec_gmax * 4 +
         size_t(ec_gate_floats(ec_rmax, ec_gmax)) * 4;
}

// The last CTA of a launch with ECs to finish puts the counters back to zero for the next launch (every CTA has
// passed its wait and every slice has arrived by then). Every thread calls it.
__device__ __forceinline__ void ec_launch_done(const W4DecodeParams& p) {
  if (p.ec_cols == 0) return;
  __syncthreads();
  if (threadIdx.x != 0) return;
  __threadfence();
  if (atomicAdd(p.done, 1u) == gridDim.x * gridDim.y - 1) {
    *p.done = 0;
    for (int i = 0; i < p.count; ++i)
      if (p.mat[i].has_ec) p.mat[i].ec.counters[1] = 0;
    __threadfence();
  }
}

// kMirror: the instance with the P2P dual-write in its epilogue (its own instance, so that the others' registers
// and spills stay as they were).
template <int T, bool kGrouped, bool kMirror>
__global__ void __launch_bounds__(kThreads, dec_min_blocks(T, kGrouped)) w4a16_decode_kernel(const __grid_constant__ W4DecodeParams p) {
  constexpr int P = dec_pipe(T, kGrouped);
  constexpr int NP = T == 1 ? 1 : T / 2;  // ldmatrix calls per k-step (x2 for T = 1, else x4 per 2 tiles)
  extern __shared__ __align__(16) unsigned char smem[];
  const int R = p.R, KS = kWarps / R;
  float4* red = reinterpret_cast<float4*>(smem);
  float4* cred = red + kWarps * T * 32;
  float* ss = reinterpret_cast<float*>(cred + R * T * 32);
  uint16_t* zs = reinterpret_cast<uint16_t*>(ss + p.gmax * R * 16);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(zs + p.gmax * R * 16);
  __nv_bfloat16* ecb = xs + p.m * p.xs_stride;                      // B rows of this CTA (fused EC)
  float* eczs = reinterpret_cast<float*>(ecb + R * 16 * p.ec_rmax);  // g ⊙ z [m][rank]
  float* eczt = eczs + p.m * p.ec_rmax;                              // z [m][rank]
  float* echb = eczt + p.m * p.ec_rmax;                              // gate hidden [m][gate width]
  float* ecgs = echb + p.m * p.ec_gmax;                              // gate parameters

  // EC CTAs (leading columns): one k-slice of A·x each, then they leave (w4a16_ec.cuh).
  if (int(blockIdx.x) < p.ec_cols) {
    int e = 0;
#pragma unroll
    for (int i = 1; i < kDecMaxMats; ++i)
      if (i < p.count && p.mat[i].has_ec && int(blockIdx.x) >= p.mat[i].ec.col0) e = i;
    const W4DecEc& ec = p.mat[e].ec;
    const int slice = (int(blockIdx.x) - ec.col0) * int(gridDim.y) + int(blockIdx.y);
    uint4 a[kEcRing];
    ec_prefetch(ec, slice, p.k, a);
    pdl_launch_dependents();
    pdl_wait();
    ec_slice(ec, slice, a, p.x, p.m, p.k, smem);
    ec_launch_done(p);
    return;
  }

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
  fill_weight_ring(ring, wq, kb0, kb1, active, pol);

  uint32_t nz_lo = neg_zero_pair(0x4300u), nz_hi = nz_lo;
  float sc_lo = 0.f, sc_hi = 0.f;
  int cg_lo = 0;
  if constexpr (!kGrouped) {
    if (tile_ok) load_channel_params(mt.scales, mt.zeros, r_lo, r_hi, nz_lo, nz_hi, sc_lo, sc_hi);
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
  if (mt.has_ec) {  // this CTA's rows of B (constants, like the weights): rows >= n zero-filled
    const int r = mt.ec.rank, segs = r / 8, row0 = rgl * R * 16;
    for (int i = tid; i < R * 16 * segs; i += kThreads) {
      const int row = i / segs, sg = i - row * segs;
      const bool ok = row0 + row < mt.n;
      cp_async16(smem_u32(ecb + row * r + sg * 8), ok ? mt.ec.B + size_t(row0 + row) * r + sg * 8 : mt.ec.B, ok);
    }
    ec_prefetch_gate(mt.ec, ecgs);
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
      stage_x_segment(xs + r * p.xs_stride + cs * 8, p.x, p.k, r, col, xlim, true, p.x_vec);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // ldmatrix lane addresses (see the general kernel), one per pair of token tiles; rows >= m read row 0.
  uint32_t xrow[NP];
  {
    const uint32_t xs_base = smem_u32(xs);
    const int lrow = ldmatrix_row<T>(lane);
    const uint32_t kofs = uint32_t((lane >> 3) & 1) * 16;
#pragma unroll
    for (int pi = 0; pi < NP; ++pi) {
      const int row = pi * 16 + lrow;
      xrow[pi] = xs_base + uint32_t((row < p.m ? row : 0) * p.xs_stride * 2) + kofs;
    }
  }

  // Accumulators. C independent MMA chains (T = 1 has one MMA per k-step: two chains halve the dependent
  // latency). Folded zero point (T <= 2): the fragments hold 128 + q (no per-k-step subtraction) and an MMA of
  // ones against the same x fragment sums x, so the result is s · (Σ (128 + q) x − (128 + z) · Σ x). For
  // T = 4 the subtraction costs less than the extra MMAs, so the fragments hold q − z as in the general kernel.
  constexpr int C = T == 1 ? 2 : 1;
  constexpr bool kFold = T <= 2;
  float acc[C][T][4], part[C][T][4], xsum[C][T][4], xpart[C][T][4];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    zero_accumulators(acc[c], part[c]);
    zero_accumulators(xsum[c], xpart[c]);
  }
  // −(128 + z) of rows g and g + 8 as floats (the low half of the bf16 pair is the value).
  auto zero_f = [](uint32_t nz) { return __uint_as_float(nz << 16); };
  auto fold = [&]() {  // grouped: the finished group, scaled, into acc[0]; clear the group's sums
    const float z_lo = zero_f(nz_lo), z_hi = zero_f(nz_hi);
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int tt = 0; tt < T; ++tt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = kFold ? fmaf(e < 2 ? z_lo : z_hi, xpart[c][tt][e], part[c][tt][e]) : part[c][tt][e];
          acc[0][tt][e] = fmaf(v, e < 2 ? sc_lo : sc_hi, acc[0][tt][e]);
          part[c][tt][e] = xpart[c][tt][e] = 0.f;
        }
  };

  int grp = 0, grp_next = INT_MAX;
  if constexpr (kGrouped) start_groups(kb0, mt.group_size, mt.groups, grp, grp_next);

  auto kstep = [&](uint32_t w, uint32_t koff, int ksi) {
    if constexpr (kGrouped) {
      if (ksi == grp_next) {
        fold();
        advance_group(grp, grp_next, mt.groups, mt.group_steps);
        const int slot = (grp - cg_lo) * (R * 16) + rsub * 16 + g;
        load_group_params(ss, zs, slot, sc_lo, sc_hi, nz_lo, nz_hi);
      }
    }
    uint32_t a[4];
    if constexpr (kFold) {
      a[0] = nibbles_to_bf16x2(w);
      a[1] = nibbles_to_bf16x2(w >> 4);
      a[2] = nibbles_to_bf16x2(w >> 8);
      a[3] = nibbles_to_bf16x2(w >> 12);
    } else {
      dequant_fragment(w, nz_lo, nz_hi, a);
    }
    constexpr uint32_t kOnes = 0x3F803F80u;  // bf16x2 {1, 1}
    const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
    const int c = C == 2 ? (ksi & 1) : 0;
    float(&dst)[T][4] = kGrouped ? part[c] : acc[c];
    float(&xdst)[T][4] = kGrouped ? xpart[c] : xsum[c];
    if constexpr (T == 1) {
      uint32_t b0, b1;
      ldmatrix_x2(xrow[0] + koff, b0, b1);
      mma_bf16(dst[0], a, b0, b1);
      if constexpr (kFold) mma_bf16(xdst[0], ones, b0, b1);
    } else {
#pragma unroll
      for (int pi = 0; pi < NP; ++pi) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(xrow[pi] + koff, b0, b1, b2, b3);
        mma_bf16(dst[2 * pi], a, b0, b1);
        mma_bf16(dst[2 * pi + 1], a, b2, b3);
        if constexpr (kFold) {
          mma_bf16(xdst[2 * pi], ones, b0, b1);
          mma_bf16(xdst[2 * pi + 1], ones, b2, b3);
        }
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
          // Consume, then refill (see the general kernel: refilling first serializes the ring).
          const uint32_t ko = uint32_t(b - cta_kb0) * (kKBlock * 2);
          kblock_steps(ring[i], ko, b, kstep);
          if (b + P < kb1) ring[i] = ld_weights(wnext + i * 32, pol);
        }
      }
    }
    if constexpr (kGrouped) fold();
  }

  // 5. Reduction: each warp's scaled partial tile (grouped: scaled per group in fold).
  {
    const float z_lo = zero_f(nz_lo), z_hi = zero_f(nz_hi);
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
      float v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (kGrouped) {
          v[e] = acc[0][tt][e];
        } else {
          float sa = 0.f, sx = 0.f;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            sa += acc[c][tt][e];
            sx += xsum[c][tt][e];
          }
          if constexpr (kFold) sa = fmaf(e < 2 ? z_lo : z_hi, sx, sa);
          v[e] = sa * (e < 2 ? sc_lo : sc_hi);
        }
      }
      red[(warp * T + tt) * 32 + lane] = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
  __syncthreads();
  if (mt.has_ec) ec_gate(mt.ec, p.m, eczs, eczt, echb, ecgs);
  const int ecr = mt.has_ec ? mt.ec.rank : 0;
  const __nv_bfloat16* ecb_lo = ecb + (rsub * 16 + g) * ecr;
  const __nv_bfloat16* ecb_hi = ecb_lo + 8 * ecr;

  // The dual-write of token tok's rows r_lo, r_hi (all 32 lanes call it: the shuffles): the lanes of even g pair
  // their rows with the next ones (lane + 4 holds row + 1) into one 8-byte LL store per peer (w4a16_gemm.h).
  auto mirror_store = [&](int tok, __nv_bfloat16 lo, __nv_bfloat16 hi) {
    const W4PeerMirror& mr = p.mirror;
    const uint32_t lo_bits = __bfloat16_as_ushort(lo), hi_bits = __bfloat16_as_ushort(hi);
    const uint32_t lo_next = __shfl_down_sync(0xffffffffu, lo_bits, 4);
    const uint32_t hi_next = __shfl_down_sync(0xffffffffu, hi_bits, 4);
    if ((g & 1) || tok >= p.m) return;
    const uint32_t e = mr.epoch[tok] + 1;
    for (int q = 0; q < mr.ranks; ++q) {
      if (q == mr.rank) continue;
      unsigned char* slot =
          mr.staging[q] + ((int64_t(e & 1u) * mr.ranks + mr.rank) * mr.max_rows + tok) * mr.slot_bytes;
      if (r_lo < mt.n) peer::st_volatile_v2(slot + 4 * r_lo, lo_bits | (lo_next << 16), e);
      if (r_hi < mt.n) peer::st_volatile_v2(slot + 4 * r_hi, hi_bits | (hi_next << 16), e);
    }
  };

  auto store = [&](int tt, const float4& s) {
    const int tok = tt * 8 + 2 * t;
    float e0 = 0.f, e1 = 0.f, e2 = 0.f, e3 = 0.f;  // B·(g ⊙ z) of (r_lo, tok), (r_lo, tok + 1), (r_hi, ...)
    if (ecr) {
      if (tok < p.m) e0 = ec_term(ecb_lo, eczs + tok * ecr, ecr), e2 = ec_term(ecb_hi, eczs + tok * ecr, ecr);
      if (tok + 1 < p.m)
        e1 = ec_term(ecb_lo, eczs + (tok + 1) * ecr, ecr), e3 = ec_term(ecb_hi, eczs + (tok + 1) * ecr, ecr);
    }
    const __nv_bfloat16 y00 = __float2bfloat16_rn(s.x + b_lo + e0), y01 = __float2bfloat16_rn(s.z + b_hi + e2);
    const __nv_bfloat16 y10 = __float2bfloat16_rn(s.y + b_lo + e1), y11 = __float2bfloat16_rn(s.w + b_hi + e3);
    if (tok < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok) * mt.n;
      if (r_lo < mt.n) yr[r_lo] = y00;
      if (r_hi < mt.n) yr[r_hi] = y01;
    }
    if (tok + 1 < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok + 1) * mt.n;
      if (r_lo < mt.n) yr[r_lo] = y10;
      if (r_hi < mt.n) yr[r_hi] = y11;
    }
    if constexpr (kMirror) {
      mirror_store(tok, y00, y01);
      mirror_store(tok + 1, y10, y11);
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
  ec_launch_done(p);
}

using DecodeFn = void (*)(W4DecodeParams);

template <bool kMirror>
DecodeFn decode_kernel_of(int T, bool grouped) {
  switch (T) {
    case 1: return grouped ? w4a16_decode_kernel<1, true, kMirror> : w4a16_decode_kernel<1, false, kMirror>;
    case 2: return grouped ? w4a16_decode_kernel<2, true, kMirror> : w4a16_decode_kernel<2, false, kMirror>;
    default: return grouped ? w4a16_decode_kernel<4, true, kMirror> : w4a16_decode_kernel<4, false, kMirror>;
  }
}

DecodeFn decode_kernel_for(int T, bool grouped, bool mirror = false) {
  return mirror ? decode_kernel_of<true>(T, grouped) : decode_kernel_of<false>(T, grouped);
}

// ---- decode plan: tiles per CTA R and cluster size S from a small time model (µs) of one launch:
//   waves × (latency + max(bytes / bandwidth, issue time, serial latency of a slice longer than the ring))
//   + x staging + the reductions (shared memory; cluster barriers and DSMEM when S > 1).
// The constants are rough H100/H200 figures; the choice only needs to be near the best, not exact.
// The fused compensators of a launch as the planner needs them.
struct EcPlanInfo {
  int n = 0, rmax = 0, gmax = 0, cpr_max = 0;
  int base_slices[kDecMaxMats] = {};  // k-slices of each EC (0: matrix without one)
  int cols(int S) const {             // EC CTA columns with S CTAs per cluster column
    int c = 0;
    for (int i = 0; i < kDecMaxMats; ++i) c += (base_slices[i] + S - 1) / S;
    return c;
  }
};

// 256-column chunks per k-slice of a rank-r EC over k: as few as keep the slices at most 64 (registers:
// rank / 8 rows × cpr chunks <= kEcRing per lane); 0 when no such split exists (not fusable).
int ec_cpr(int rank, int k) {
  const int chunks = (k + 255) / 256;
  const int cpr = (chunks + 63) / 64;
  return (rank / 8) * cpr <= kEcRing ? cpr : 0;
}

struct DecodePlan {
  int R = 0, S = 0, kbw = 0, xs_stride = 0, gmax = 0;
  size_t smem = 0;
  double cost = 1e300;
};

// force_r / force_s: 0 lets the model choose; a forced pair may leave CTAs without k-blocks (they only reduce).
// ec: the fused compensators of the launch (null: none). With them the plan adds their EC CTA columns and
// their shared memory, and must run in one wave (w4a16_ec.cuh: every CTA resident at once).
DecodePlan plan_decode(int T, int m, const W4Device* w, int count, int sm_count, int force_r, int force_s,
                       const EcPlanInfo* ec = nullptr) {
  const int ec_rmax = ec ? ec->rmax : 0, ec_gmax = ec ? ec->gmax : 0;
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
    if (force_r && R != force_r) continue;
    const int KS = kWarps / R;
    long ctas_w4 = 0;
    for (int i = 0; i < count; ++i) ctas_w4 += (w[i].n_pad / 16 + R - 1) / R;
    for (int S = 1; S <= max_s; ++S) {
      const long ctas_x = ctas_w4 + (ec ? ec->cols(S) : 0);
      if (force_s && S != std::min(force_s, max_s)) continue;
      const int KT = KS * S;
      const int kbw = (kblocks + KT - 1) / KT;
      const bool forced = force_r || force_s;
      if (!forced && S > 1 && (S - 1) * KS * kbw >= kblocks) continue;  // a CTA without k-blocks
      const int cta_cols = KS * kbw * kKBlock;
      int gmax = 0;
      for (int i = 0; i < count; ++i)
        if (w[i].groups > 1) gmax = std::max(gmax, std::min(w[i].groups, (cta_cols - 1) / w[i].group_size + 2));
      const int xs_stride = cta_cols + 8;
      const size_t smem = std::max(dec_smem_bytes(T, R, gmax, m, xs_stride, ec_rmax, ec_gmax),
                                   ec ? ec_cta_smem_bytes(m, ec->cpr_max, ec_rmax) : size_t(0));
      if (smem + kDecStaticSmemMargin > dev.smem_optin) continue;
      const int resident =
          std::min<int>(dec_min_blocks(T, count > 0 && w[0].groups > 1), int(dev.smem_per_sm / std::max<size_t>(smem + dev.smem_reserved, 1)));
      if (resident < 1) continue;
      const long ctas = ctas_x * S;
      const long slots = long(sm_count) * resident;
      const long waves = (ctas + slots - 1) / slots;
      if (ec && waves > 1) continue;
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

void set_decode_max_smem_impl(int T, bool grouped, int bytes) {
  for (bool mirror : {false, true}) {
    cudaFuncAttributes a{};
    SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&a, decode_kernel_for(T, grouped, mirror)));
    SPEAR_CHECK(a.sharedSizeBytes <= size_t(kDecStaticSmemMargin),
                "internal: decode kernel static shared memory {} B", a.sharedSizeBytes);
    SPEAR_CUDA_CHECK(cudaFuncSetAttribute(decode_kernel_for(T, grouped, mirror),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, bytes - kDecStaticSmemMargin));
  }
}

// Tuned plans, process-wide: launch shape → (R, S).
// device, T, grouped · 65536 + count, k_pad, n_pad of each, fused ECs (rank of each, in 8 bits; gate width)
using TuneKey = std::array<int, 6 + kDecMaxMats>;
std::mutex g_tune_mu;
// The bulk-copy kernel stages all of x per CTA, so its time grows with m much faster than the register ring's:
// it runs only at the m it won at; other m of the same token tiles take the best register-ring plan.
struct TunedPlan {
  std::pair<int, int> best, ring;  // (R, S) of the fastest plan, and of the fastest register-ring plan
  int m = 0;                       // tokens of the timed launch
};
std::map<TuneKey, TunedPlan> g_tuned;

TuneKey tune_key(int T, const W4Device* w, int count, const EcPlanInfo* ec = nullptr) {
  TuneKey key{};
  if (ec)
    for (int i = 0; i < kDecMaxMats; ++i) key[4 + kDecMaxMats] |= (ec->base_slices[i] ? 1 : 0) << i;
  if (ec) key[5 + kDecMaxMats] = ec->rmax * 4096 + ec->gmax;
  key[0] = device_facts().device;
  key[1] = T;
  key[2] = (w[0].groups > 1 ? w[0].group_size : 0) * 65536 + count;
  key[3] = w[0].k_pad;
  for (int i = 0; i < count; ++i) key[4 + i] = w[i].n_pad;
  return key;
}

bool decode_takes(int m, const W4Device* w, int count) {
  const int T = token_tiles(m);
  if (m > kDecMaxTokens || T > 4 || count < 1 || count > kDecMaxMats) return false;
  const bool grouped = w[0].groups > 1;
  for (int i = 1; i < count; ++i)
    if ((w[i].groups > 1) != grouped || w[i].k_pad != w[0].k_pad || w[i].k != w[0].k) return false;
  return true;
}

EcPlanInfo ec_plan_info(int k, int count, const W4EcDevice* const* ec) {
  EcPlanInfo info;
  for (int i = 0; i < count; ++i) {
    if (!ec || !ec[i]) continue;
    const int cpr = ec_cpr(ec[i]->rank, k);
    info.base_slices[i] = (k + 256 * cpr - 1) / (256 * cpr);
    info.rmax = std::max(info.rmax, ec[i]->rank);
    info.cpr_max = std::max(info.cpr_max, cpr);
    info.gmax = std::max(info.gmax, ec[i]->W1 ? (ec[i]->gate_width + 3) / 4 * 4 : 0);
    ++info.n;
  }
  return info;
}

// Fills the fused-EC part of the params: EC CTA columns first (p.ec_cols), S slices per column.
void set_ec_params(W4DecodeParams& p, const W4EcDevice* const* ec, const EcPlanInfo& info, int S) {
  int col = 0;
  for (int i = 0; i < p.count; ++i) {
    if (!ec[i]) continue;
    const W4EcDevice& e = *ec[i];
    W4DecEc& d = p.mat[i].ec;
    p.mat[i].has_ec = 1;
    d.A = e.A, d.B = e.B, d.W1 = e.W1, d.b1 = e.b1, d.W2 = e.W2, d.b2 = e.b2;
    d.rank = e.rank;
    d.gate_width = e.W1 ? e.gate_width : 0;
    d.counters = static_cast<unsigned*>(e.scratch);
    d.zpart = reinterpret_cast<float*>(static_cast<char*>(e.scratch) + kEcCounterBytes);
    d.cpr = ec_cpr(e.rank, p.k);
    d.cols = (info.base_slices[i] + S - 1) / S;
    d.slices = d.cols * S;
    d.col0 = col;
    col += d.cols;
    if (!p.done) p.done = d.counters;
  }
  p.ec_cols = col;
  p.ec_rmax = info.rmax;
  p.ec_gmax = info.gmax;
}

void launch_plan(const DecodePlan& plan, const __nv_bfloat16* x, int m, const W4Device* w, int count,
                 const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, const W4GemmOptions& o,
                 cudaStream_t stream, const W4EcDevice* const* ec = nullptr, const EcPlanInfo* ec_info = nullptr,
                 const W4PeerMirror* mirror = nullptr) {
  const int T = token_tiles(m);
  const bool grouped = w[0].groups > 1;
  W4DecodeParams p{};
  p.count = count;
  p.k = w[0].k;
  if (ec && ec_info) set_ec_params(p, ec, *ec_info, plan.S);
  int rg = p.ec_cols;
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
  p.m = m;
  p.kblocks = w[0].k_pad / kKBlock;
  p.R = plan.R;
  p.S = plan.S;
  p.kbw = plan.kbw;
  p.xs_stride = plan.xs_stride;
  p.gmax = plan.gmax;
  p.x_vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0 && w[0].k % 8 == 0;
  if (mirror) p.mirror = *mirror;
  const bool pdl = o.pdl && device_facts().major >= 9;
  launch(decode_kernel_for(T, grouped, mirror != nullptr), dim3(rg, plan.S), plan.smem, plan.S, pdl, stream, p);
}


}  // namespace

void set_decode_max_smem(int T, bool grouped, int bytes) { set_decode_max_smem_impl(T, grouped, bytes); }

namespace {

// The plan a launch runs: forced by the options, else the tuned one for this shape, else the time model's (also
// when a forced or tuned plan does not fit). R == 0: none fits.
DecodePlan choose_plan(int m, const W4Device* w, int count, int sm_count, const W4GemmOptions& o,
                       const EcPlanInfo* ec = nullptr) {
  const int T = token_tiles(m);
  int fr = o.decode_rows, fs = o.decode_splits;
  if (!fr && !fs) {
    std::lock_guard<std::mutex> lock(g_tune_mu);
    const auto it = g_tuned.find(tune_key(T, w, count, ec));
    if (it != g_tuned.end()) {
      const TunedPlan& t = it->second;
      std::tie(fr, fs) = t.best.first == kBulkPlan && m != t.m ? t.ring : t.best;
    }
  }
  if (fr == kBulkPlan) {
    if (!ec && bulk_takes(m, w, count)) {
      DecodePlan bulk;
      bulk.R = kBulkPlan;
      bulk.S = 1;
      return bulk;
    }
    fr = fs = 0;
  }
  DecodePlan plan = plan_decode(T, m, w, count, sm_count, fr, fs, ec);
  if (plan.R == 0 && (fr || fs)) plan = plan_decode(T, m, w, count, sm_count, 0, 0, ec);
  return plan;
}

}  // namespace

// The decode kernel over count matrices sharing x; false when no plan fits (the caller takes the general path).
bool launch_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                   __nv_bfloat16* const* y, int sm_count, const W4GemmOptions& o, cudaStream_t stream) {
  if (!decode_takes(m, w, count)) return false;
  const DecodePlan plan = choose_plan(m, w, count, sm_count, o);
  if (plan.R == 0) return false;
  if (plan.R == kBulkPlan)
    launch_bulk(x, m, w, count, bias, y, o, stream);
  else
    launch_plan(plan, x, m, w, count, bias, y, o, stream);
  return true;
}

bool launch_decode_mirrored(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias,
                            __nv_bfloat16* y, const W4PeerMirror& mirror, int sm_count, const W4GemmOptions& o,
                            cudaStream_t stream) {
  if (!decode_takes(m, &w, 1) || w.n % 8 != 0 || m > mirror.max_rows) return false;
  DecodePlan plan = choose_plan(m, &w, 1, sm_count, o);
  if (plan.R == kBulkPlan) plan = plan_decode(token_tiles(m), m, &w, 1, sm_count, 0, 0);  // no dual-write there
  if (plan.R == 0) return false;
  launch_plan(plan, x, m, &w, 1, &bias, &y, o, stream, nullptr, nullptr, &mirror);
  return true;
}

bool ec_fusable(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  if (!decode_takes(m, w, count) || w[0].k % 8 != 0) return false;
  for (int i = 0; i < count; ++i) {
    if (!ec || !ec[i]) continue;
    const W4EcDevice& e = *ec[i];
    if (e.rank < 8 || e.rank % 8 || e.rank > kW4EcMaxRank || e.gate_width < 0 || e.gate_width > kW4EcMaxGate ||
        ec_cpr(e.rank, w[0].k) == 0 ||
        !e.A || !e.B || !e.scratch || (e.gate_width > 0 && e.W1 && (!e.b1 || !e.W2 || !e.b2)))
      return false;
  }
  return true;
}

bool launch_decode_ec(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4EcDevice* const* ec,
                      const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count,
                      const W4GemmOptions& o, cudaStream_t stream) {
  if (!ec_fusable(m, w, count, ec) || (reinterpret_cast<uintptr_t>(x) & 15) != 0) return false;
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  const DecodePlan plan = choose_plan(m, w, count, sm_count, o, info.n ? &info : nullptr);
  if (plan.R == 0) return false;
  if (plan.R == kBulkPlan)  // only chosen when no matrix has a compensator
    launch_bulk(x, m, w, count, bias, y, o, stream);
  else
    launch_plan(plan, x, m, w, count, bias, y, o, stream, ec, info.n ? &info : nullptr);
  return true;
}

bool tune_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y, void* flush,
                 size_t flush_bytes, int sm_count, cudaStream_t stream, int reps, const W4EcDevice* const* ec) {
  if (!decode_takes(m, w, count)) return false;
  if (ec && !ec_fusable(m, w, count, ec)) return false;
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  const EcPlanInfo* ei = info.n ? &info : nullptr;
  const int T = token_tiles(m);
  const DeviceFacts& dev = device_facts();
  const W4GemmOptions o = w4a16_get_options();
  cudaEvent_t ev[2];
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[0]));
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[1]));
  double best_us = 1e300;
  std::pair<int, int> best{0, 0};
  for (int R : {1, 2, 4, 8})
    for (int S = 1; S <= (dev.major >= 9 ? kDecMaxCluster : 1); ++S) {
      const DecodePlan plan = plan_decode(T, m, w, count, sm_count, R, S, ei);
      if (plan.R != R || plan.S != S) continue;
      const int kblocks = w[0].k_pad / kKBlock, KS = kWarps / R;
      if (S > 1 && (S - 1) * KS * plan.kbw >= kblocks) continue;  // a CTA without k-blocks
      std::vector<float> ts;
      try {
        launch_plan(plan, x, m, w, count, nullptr, y, o, stream, ec, ei);  // warm-up (first use of the instance)
        for (int r = 0; r < reps; ++r) {
          if (flush) SPEAR_CUDA_CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, stream));
          SPEAR_CUDA_CHECK(cudaEventRecord(ev[0], stream));
          launch_plan(plan, x, m, w, count, nullptr, y, o, stream, ec, ei);
          SPEAR_CUDA_CHECK(cudaEventRecord(ev[1], stream));
          SPEAR_CUDA_CHECK(cudaEventSynchronize(ev[1]));
          float ms = 0.f;
          SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
          ts.push_back(ms);
        }
      } catch (const Error&) {  // a plan the device cannot launch after all (cluster resources): skip it
        (void)cudaGetLastError();
        SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
        continue;
      }
      std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
      const double us = 1e3 * ts[ts.size() / 2];
      if (us < best_us) best_us = us, best = {R, S};
    }
  bool bulk_wins = false;
  if (!ei && o.bulk && bulk_takes(m, w, count)) {
    std::vector<float> ts;
    launch_bulk(x, m, w, count, nullptr, y, o, stream);  // warm-up
    for (int r = 0; r < reps; ++r) {
      if (flush) SPEAR_CUDA_CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, stream));
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[0], stream));
      launch_bulk(x, m, w, count, nullptr, y, o, stream);
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[1], stream));
      SPEAR_CUDA_CHECK(cudaEventSynchronize(ev[1]));
      float ms = 0.f;
      SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      ts.push_back(ms);
    }
    std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
    const double us = 1e3 * ts[ts.size() / 2];
    if (us < best_us) bulk_wins = true;
  }
  cudaEventDestroy(ev[0]);
  cudaEventDestroy(ev[1]);
  if (best.first == 0) return false;
  std::lock_guard<std::mutex> lock(g_tune_mu);
  TunedPlan& t = g_tuned[tune_key(T, w, count, ei)];
  t.ring = best;
  t.best = bulk_wins ? std::pair<int, int>{kBulkPlan, 1} : best;
  t.m = m;
  return true;
}

std::pair<int, int> decode_plan(int m, const W4Device* w, int count, int sm_count) {
  if (!decode_takes(m, w, count)) return {0, 0};
  const DecodePlan plan = choose_plan(m, w, count, sm_count, w4a16_get_options());
  return {plan.R, plan.S};
}

bool decode_tuned(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  if (!decode_takes(m, w, count) || (ec && !ec_fusable(m, w, count, ec))) return true;  // nothing to tune
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  std::lock_guard<std::mutex> lock(g_tune_mu);
  return g_tuned.count(tune_key(token_tiles(m), w, count, info.n ? &info : nullptr)) > 0;
}

void clear_tuning() {
  std::lock_guard<std::mutex> lock(g_tune_mu);
  g_tuned.clear();
}

}  // namespace spear::cuda::w4_detail
