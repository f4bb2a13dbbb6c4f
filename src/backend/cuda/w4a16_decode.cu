// W4A16 decode kernel (m <= 32, also grouped launches of up to 4 matrices sharing x) and its launcher; its
// planner and tuner are in w4a16_decode_plan.cu. Built for latency: weights in flight before griddepcontrol.wait
// (PDL), x staged once, split-K reduced in shared memory and across a thread-block cluster through distributed
// shared memory (no workspace). The code layout, the dequantization and the general kernel are described in
// w4a16_gemm.cu; the device helpers both kernels share are in w4a16_common.cuh.
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
#include <cstdint>

#include <cooperative_groups.h>

#include "backend/cuda/peer_sync.cuh"
#include "backend/cuda/w4a16_decode_plan.h"
#include "backend/cuda/w4a16_ec.cuh"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda::w4_detail {

namespace {

namespace cg = cooperative_groups;

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
  // Fused compensators (w4a16_ec.cuh): blockIdx.x < ec_cols are EC CTAs (the W4 CTAs follow).
  // ec_rmax / ec_gmax: the largest rank / gate width (shared memory).
  int ec_cols, ec_rmax, ec_gmax;
  int ec_w4_gate;       // the slice sum and the gate in every W4 CTA (else in the last EC CTA; DecodePlan)
  int ec_project;       // projection only (w4a16_gemm_ec_project): the W4 CTAs run plain, the last EC CTA of each EC
                        // writes z (1) or g ⊙ z (2) to its zout
  W4PeerMirror mirror;  // P2P dual-write of the output (count 1; ranks <= 1: none)
  W4FuseDev fx;         // decode-step fusions (w4a16_fusion.cuh; m <= 8, without mirror; the W4 CTAs run the tails)
};


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
    float* gs = reinterpret_cast<float*>(smem + ec_cta_smem_bytes(p.m, ec.cpr));  // after the x staging
    if (p.ec_project ? p.ec_project == 2 : !p.ec_w4_gate) ec_prefetch_gate(ec, gs);
    cp_async_commit();
    pdl_launch_dependents();
    pdl_wait();
    ec_slice(ec, slice, a, p.x, p.m, p.k, smem);
    if (p.ec_project)
      ec_finish_z(ec, p.m, gs, [] { __syncthreads(); }, p.ec_project == 2);
    else if (!p.ec_w4_gate)
      ec_finish(ec, p.m, gs, [] { __syncthreads(); });
    return;
  }

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  int mi = 0;
#pragma unroll
  for (int i = 1; i < kDecMaxMats; ++i)
    if (i < p.count && int(blockIdx.x) >= p.mat[i].rg_begin) mi = i;
  const W4DecMat& mt = p.mat[mi];
  const bool has_ec = mt.has_ec && !p.ec_project;  // this CTA adds the EC's term (CTA-uniform)
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
  if (has_ec) {  // this CTA's rows of B (and the gate where the W4 CTAs apply it)
    ec_prefetch_b(mt.ec, rgl * R * 16, R * 16, mt.n, ecb);
    if (p.ec_w4_gate) ec_prefetch_gate(mt.ec, ecgs);
    cp_async_commit();
  }

  // 2. Let the next kernel start its own weight prefetch; wait for the previous one (x, bias, y).
  pdl_launch_dependents();
  pdl_wait();
  // The launch's EC epoch, loaded now and parked in shared memory after the x staging (not held in a
  // register through the main loop): its latency hides behind the staging.
  __shared__ uint32_t ec_ep;
  uint32_t ep = 0;
  if (has_ec && tid == 0) ep = ec_epoch(mt.ec);

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
  if (has_ec && tid == 0) ec_ep = ep;
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
  const unsigned long long ec_pre = has_ec && !p.ec_w4_gate ? ec_gz_issue(mt.ec, p.m) : 0ull;

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
  if (has_ec) {
    if (p.ec_w4_gate)
      ec_gate(mt.ec, ec_ep, p.m, eczs, eczt, echb, ecgs, [] { __syncthreads(); });
    else
      ec_gz_wait(mt.ec, ec_ep, p.m, eczs, ec_pre, [] { __syncthreads(); });
  }
  const int ecr = has_ec ? mt.ec.rank : 0;
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
    if (ecr && tok < p.m)
      ec_terms(ecb_lo, ecb_hi, eczs + tok * ecr, eczs + (tok + 1) * ecr, ecr, tok + 1 < p.m, e0, e1, e2, e3);
    const __nv_bfloat16 y00 = __float2bfloat16_rn(s.x + b_lo + e0), y01 = __float2bfloat16_rn(s.z + b_hi + e2);
    const __nv_bfloat16 y10 = __float2bfloat16_rn(s.y + b_lo + e1), y11 = __float2bfloat16_rn(s.w + b_hi + e3);
    if (tok < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok) * mt.n;
      if (r_lo < mt.n) store_output(yr + r_lo, y00, p.fx.residual);
      if (r_hi < mt.n) store_output(yr + r_hi, y01, p.fx.residual);
    }
    if (tok + 1 < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok + 1) * mt.n;
      if (r_lo < mt.n) store_output(yr + r_lo, y10, p.fx.residual);
      if (r_hi < mt.n) store_output(yr + r_hi, y11, p.fx.residual);
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
      if (tile_ok) {
        store(tt, s);
        if (T == 1 && p.fx.swiglu_out) swiglu_pair_tail(p.fx, p.mat[0].y, p.mat[1].y, mt.n, p.m, tile, lane);
      }
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
      if (tile_ok) {
        store(tt, s);
        if (T == 1 && p.fx.swiglu_out) swiglu_pair_tail(p.fx, p.mat[0].y, p.mat[1].y, mt.n, p.m, tile, lane);
      }
    }
    cluster.sync();  // no CTA leaves while another still reads its shared memory
  }
#endif
  if (has_ec && tid == 0)  // the EC's readers: the matrix's W4 CTAs
    ec_leave(mt.ec, rgl * int(gridDim.y) + int(blockIdx.y), (mt.n_tiles + R - 1) / R * int(gridDim.y));
  if (T == 1 && p.fx.norm_out) {  // fusions run at m <= 8 only: the other instances need no tail code
    __shared__ int last;
    norm_tail(p.fx, p.mat[0].y, p.m, p.mat[0].n, (gridDim.x - p.ec_cols) * gridDim.y, reinterpret_cast<float*>(red),
              &last, tid,
              [] { __syncthreads(); });
  }
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

// Fills the fused-EC part of the params: EC CTA columns first (p.ec_cols), S slices per column.
void set_ec_params(W4DecodeParams& p, const W4EcDevice* const* ec, const EcPlanInfo& info, int S) {
  int col = 0;
  for (int i = 0; i < p.count; ++i) {
    if (!ec[i]) continue;
    p.mat[i].has_ec = 1;
    p.mat[i].ec = dec_ec_of(*ec[i], p.k, info.base_slices[i], S, col);
    col += p.mat[i].ec.cols;
  }
  p.ec_cols = col;
  p.ec_rmax = info.rmax;
  p.ec_gmax = info.gmax;
}

}  // namespace

void launch_plan(const DecodePlan& plan, const __nv_bfloat16* x, int m, const W4Device* w, int count,
                 const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, const W4GemmOptions& o,
                 cudaStream_t stream, const W4EcDevice* const* ec, const EcPlanInfo* ec_info,
                 const W4PeerMirror* mirror, const W4Fusion* fusion, float* const* ec_z) {
  const int T = token_tiles(m);
  const bool grouped = w[0].groups > 1;
  W4DecodeParams p{};
  p.count = count;
  p.k = w[0].k;
  if (ec && ec_info) set_ec_params(p, ec, *ec_info, plan.S);
  p.ec_w4_gate = plan.ec_w4_gate;
  if (ec_info && ec_info->project) {  // each EC writes z (or g ⊙ z) to ec_z[i]
    p.ec_project = ec_info->project_gated ? 2 : 1;
    p.ec_rmax = p.ec_gmax = 0;  // the W4 CTAs' shared memory holds no EC state
    for (int i = 0; i < count; ++i)
      if (ec[i]) p.mat[i].ec.zout = ec_z[i];
  }
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
  p.fx = fuse_of(fusion);
  const bool pdl = o.pdl && device_facts().major >= 9;
  launch(decode_kernel_for(T, grouped, mirror != nullptr), dim3(rg, plan.S), plan.smem, plan.S, pdl, stream, p);
}


void set_decode_max_smem(int T, bool grouped, int bytes) { set_decode_max_smem_impl(T, grouped, bytes); }

}  // namespace spear::cuda::w4_detail
