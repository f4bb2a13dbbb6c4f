// W4A16 decode, bulk-copy variant (sm_90+, m <= 8): one CTA per 16-row tile over all of k. The
// tile's codes are one contiguous region of the tile-major layout, so a producer thread requests them as
// cp.async.bulk (TMA) copies of kBulkChunk k-blocks into a ring of up to kBulkStages shared-memory stages, the first
// stages before griddepcontrol.wait; each of 8 consumer warps takes a run of consecutive k-blocks of every stage
// (mbarrier full / empty pairs). The CTA's partial sums meet in shared memory in warp order: no cluster, no workspace,
// deterministic.
//
// Why it exists (dev/cuda/w4_decode_cost_lab.cu, H200): where a matrix has few tiles and a long k (the down
// projection), the register-ring kernel must either keep few bytes in flight per warp or split k over CTAs, and
// the cross-CTA sum costs 2–4 µs; the bulk stream keeps 64 KB per CTA in flight with no split (8B down at m = 1:
// 13.1 µs vs 17.6 for the register ring with the same work per CTA). Plans are chosen by timing
// (w4a16_decode_plan.cu: tune_decode), so it only runs where it wins, and only at the m it was timed at.
//
// Fused compensators (w4a16_ec.cuh) as in the register-ring kernel: leading EC CTAs (one k-slice of A·x each),
// the W4 CTAs' rows of B and the gate prefetched with the codes, the gate and B·(g ⊙ z) in the epilogue; only
// where the launch fits in one wave (bulk_ec_takes), so the wait cannot deadlock. A projection-only launch
// (w4a16_gemm_ec_project: the W4 CTAs plain, the last EC CTA writes z) has no wait and takes any number of waves.
#include <algorithm>
#include <atomic>

#include "backend/cuda/w4a16_decode_plan.h"  // fuse_of
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda {
namespace w4_detail {

namespace {

constexpr int kBulkChunk = 16;               // k-blocks per stage (8 KB of codes)
constexpr int kBulkStages = 8;               // most stages in flight per CTA
constexpr int kBulkThreads = kThreads + 32;  // 8 consumer warps + the producer warp
constexpr int kBulkMaxGroups = 256;          // staged scale groups per tile (96 bytes each)
constexpr int kRun = kBulkChunk / kWarps;    // consecutive k-blocks per warp and stage (kRun · kWarps = kBulkChunk)

struct W4BulkMat {
  const uint4* q;
  const float* scales;
  const uint16_t* zeros;
  const __nv_bfloat16* bias;
  __nv_bfloat16* y;
  int n, n_pad, groups, group_steps;  // group_steps: k-steps of 16 per group (0: per channel)
  int tile_begin;                     // first blockIdx.x of this matrix
  int has_ec;                         // ec is set
  W4DecEc ec;
};

struct W4BulkParams {
  W4BulkMat mat[4];
  const __nv_bfloat16* x;
  int count, m, k, kblocks, stages, xs_stride, x_vec;
  int ec_cols, ec_rmax, ec_gmax;  // fused ECs: blockIdx.x < ec_cols are EC CTAs; largest rank / gate width
  int ec_w4_gate;                 // the slice sum and the gate in every W4 CTA (else in the last EC CTA)
  int ec_project;                 // projection only: the W4 CTAs run plain, the last EC CTA of each EC writes z (1) or
                                  // g ⊙ z (2) to its zout
  int ec_cluster;                 // > 0: the ECs in clusters of this many W4 CTAs, no EC CTAs (w4a16_ec_cluster.cuh)
  W4FuseDev fx;                   // decode-step fusions (w4a16_fusion.cuh; the W4 CTAs run the tails)
};

// Dynamic shared memory: the ring, x [m][xs_stride] bf16, scales [groups][16] fp32, zeros [groups][16] u16,
// the warps' partial tiles [8][32] float4; with fused ECs the tile's rows of B [16][rank] bf16, g ⊙ z and z
// [m][rank] fp32, the gate's hidden [m][gate width] and its parameters (every part a multiple of 16 bytes).
// EC CTAs stage their slice of x at the start (ec_cta_smem_bytes, less than the ring). ECs in clusters of ec_cluster
// CTAs add their part last (ec_cluster_smem_bytes).
size_t bulk_smem_bytes(int m, int kblocks, int stages, int gmax, int ec_rmax = 0, int ec_gmax = 0, int ec_cluster = 0) {
  const size_t xs_stride = size_t(kblocks) * kKBlock + 8;
  return size_t(stages) * kBulkChunk * 512 + align_up(size_t(m) * xs_stride * 2, 16) + size_t(gmax) * 16 * 6 +
         size_t(kWarps) * 32 * 16 + size_t(16) * ec_rmax * 2 + size_t(m) * ec_rmax * 8 + size_t(m) * ec_gmax * 4 +
         size_t(ec_gate_floats(ec_rmax, ec_gmax)) * 4 +
         (ec_cluster ? ec_cluster_smem_bytes(m, ec_rmax, kblocks, ec_cluster) : 0);
}

// Consumer warps' barrier (the producer warp has left).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }

// kEc: 1 the instance that runs launches with fused compensators (EC CTAs or clusters, the gate, the B term), 2 one
// for ECs in clusters only (w4a16_ec_cluster.cuh), 3 one for projection-only launches (EC CTAs, plain W4 CTAs), 0 plain. The plain instances leave the EC code out, so that they
// fit kMinBlocks CTAs per SM in the registers: where shared memory lets more CTAs in (k <= 4096 at one token), more
// tiles' codes are in flight per SM (bulk_occupancy_instance).
// kMode (DecodeGroupMode): the launch's scale groups. Per channel and groups of whole k-blocks take a loop without
// per-k-step group logic over a whole stage, each warp's two k-blocks in two MMA chains; any other launch (and a
// stage short of kBulkChunk k-blocks) the general loop.
template <int kEcInst, int kMinBlocks, int kMode>
__global__ void __launch_bounds__(kBulkThreads, kMinBlocks) w4a16_bulk_kernel(const __grid_constant__ W4BulkParams p) {
  // The W4 CTAs' EC code: none in the projection instance (its W4 CTAs are the plain ones).
  constexpr int kEc = kEcInst == 3 ? 0 : kEcInst;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  __shared__ uint32_t ec_ep;
  if ((kEcInst == 1 || kEcInst == 3) && int(blockIdx.x) < p.ec_cols) {  // EC CTAs: one k-slice of A·x each, then
    int e = 0;                                                            // they leave (w4a16_ec.cuh)
#pragma unroll
    for (int i = 1; i < 4; ++i)
      if (i < p.count && p.mat[i].ec.cols > 0 && int(blockIdx.x) >= p.mat[i].ec.col0) e = i;
    const W4DecEc& ec = p.mat[e].ec;
    uint4 a[kEcRing];
    ec_prefetch(ec, int(blockIdx.x) - ec.col0, p.k, a);
    float* gs = reinterpret_cast<float*>(smem + ec_cta_smem_bytes(p.m, ec.cpr));  // after the x staging
    const bool consumer = (threadIdx.x >> 5) < kWarps;
    if ((p.ec_project ? p.ec_project == 2 : !p.ec_w4_gate) && consumer) ec_prefetch_gate(ec, gs);
    cp_async_commit();
    pdl_launch_dependents();
    pdl_wait();
    ec_slice(ec, int(blockIdx.x) - ec.col0, a, p.x, p.m, p.k, smem);
    if (p.ec_project && consumer)
      ec_finish_z(ec, p.m, gs, consumers_sync, p.ec_project == 2);
    else if (!p.ec_w4_gate && consumer)
      ec_finish(ec, p.m, gs, consumers_sync);
    return;
  }
  const int NS = p.stages;
  uint4* ring = reinterpret_cast<uint4*>(smem);  // [NS][kBulkChunk][32]
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(ring + NS * kBulkChunk * 32);
  float* ss = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(xs) +
                                       ((size_t(p.m) * p.xs_stride * 2 + 15) & ~size_t(15)));
  int mi = 0;
#pragma unroll
  for (int i = 1; i < 4; ++i)
    if (i < p.count && int(blockIdx.x) >= p.mat[i].tile_begin) mi = i;
  const W4BulkMat& mt = p.mat[mi];
  const int gmax = mt.group_steps ? mt.groups : 0;
  uint16_t* zs = reinterpret_cast<uint16_t*>(ss + gmax * 16);
  float4* red = reinterpret_cast<float4*>(zs + gmax * 16);  // 16-byte aligned: gmax · 96 bytes before it
  __nv_bfloat16* ecb = reinterpret_cast<__nv_bfloat16*>(red + kWarps * 32);  // the tile's rows of B
  float* eczs = reinterpret_cast<float*>(ecb + 16 * p.ec_rmax);               // g ⊙ z [m][rank]
  float* eczt = eczs + p.m * p.ec_rmax;                                      // z [m][rank]
  float* echb = eczt + p.m * p.ec_rmax;                                      // gate hidden [m][gate width]
  float* ecgs = echb + p.m * p.ec_gmax;                                      // gate parameters
  const int tile = int(blockIdx.x) - mt.tile_begin;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nchunks = (p.kblocks + kBulkChunk - 1) / kBulkChunk;
  const uint4* src = mt.q + size_t(tile) * p.kblocks * 32;
  // ECs in clusters (w4a16_ec_cluster.cuh): a cluster's tiles are all of one matrix, so all its CTAs take part or none.
  const int ecc = kEc && mt.has_ec ? (kEc == 2 ? max(p.ec_cluster, 1) : p.ec_cluster) : 0;
  const int ec_astride = ecc ? ec_cl_astride(p.kblocks, ecc) : 0;
  __nv_bfloat16* ec_as = reinterpret_cast<__nv_bfloat16*>(ecgs + ec_gate_floats(p.ec_rmax, p.ec_gmax));  // A's slice
  float* ec_slots = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(ec_as) +
                                             ec_cl_region_bytes(p.ec_rmax, p.kblocks, ecc ? ecc : 1));
  const uint32_t ec_crank = ecc ? cluster_cta_rank() : 0u;
  const int ec_kb0 = int(ec_crank) * ec_cl_kblocks(p.kblocks, ecc ? ecc : 1);
  if (ecc) cluster_arrive_relaxed();  // the cluster barrier's first phase: this CTA has started

  if (threadIdx.x == 0) {
    for (int i = 0; i < NS; ++i) mbar_init(&full[i], 1), mbar_init(&empty[i], kWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWarps) {  // the producer: the first stages now, the rest as the consumers free them
    const uint64_t pol = evict_first_policy();
    auto request = [&](int c) {
      const int s = c % NS;
      if (c == NS) pdl_launch_dependents();
      if (c >= NS) mbar_wait(&empty[s], unsigned((c / NS) - 1) & 1u);
      const unsigned bytes = unsigned(min(kBulkChunk, p.kblocks - c * kBulkChunk)) * 512u;
      mbar_expect_tx(&full[s], bytes);
      bulk_copy_to_shared(ring + s * kBulkChunk * 32, src + size_t(c) * kBulkChunk * 32, bytes, &full[s], pol);
    };
    if (lane == 0) {
      for (int c = 0; c < nchunks; ++c) request(c);
      if (nchunks <= NS) pdl_launch_dependents();
    }
    if (ecc) {  // both cluster phases (w4a16_ec_cluster.cuh), every peer's partial, g ⊙ z for the consumers' epilogue
      __syncwarp();
      cluster_wait_acquire();
      cluster_arrive_relaxed();
      cluster_wait_acquire();
      ec_cluster_gz_warp(mt.ec, p.m, ec_slots, ecc, eczs, eczt, echb, ecgs);
      __syncwarp();
      named_arrive(kBarGzReady, kBulkThreads);
    }
    return;
  }

  // Consumers. Scales and zero points are load-time constants: fetched before the wait, like the codes.
  const int g = lane >> 2, t = lane & 3;
  const int r_lo = tile * 16 + g, r_hi = r_lo + 8;
  uint32_t nz_lo = 0, nz_hi = 0;
  float sc_lo = 0.f, sc_hi = 0.f;
  if (gmax) {
    for (int i = threadIdx.x; i < gmax * 4; i += kThreads)  // [groups][16] fp32: 4 segments per group
      cp_async16(smem_u32(ss + i * 4), mt.scales + size_t(i / 4) * mt.n_pad + tile * 16 + (i % 4) * 4, true);
    for (int i = threadIdx.x; i < gmax * 2; i += kThreads)  // [groups][16] u16: 2 segments per group
      cp_async16(smem_u32(zs + i * 8), mt.zeros + size_t(i / 2) * mt.n_pad + tile * 16 + (i % 2) * 8, true);
  } else {
    load_channel_params(mt.scales, mt.zeros, r_lo, r_hi, nz_lo, nz_hi, sc_lo, sc_hi);
  }
  if (kEc && mt.has_ec) {  // the tile's rows of B (and the gate where the W4 CTAs apply it), the cluster's A slice
    ec_prefetch_b(mt.ec, tile * 16, 16, mt.n, ecb);
    if (p.ec_w4_gate || ecc) ec_prefetch_gate(mt.ec, ecgs);
    if (ecc)
      ec_cluster_prefetch_a(mt.ec, p.k, ec_kb0 * kKBlock, ec_cl_kblocks(p.kblocks, ecc) * kKBlock, ec_astride, ec_as);
  }
  pdl_launch_dependents();
  pdl_wait();
  uint32_t ep = 0;  // the launch's EC epoch: loaded now, parked in shared memory after the x staging
  if (kEc == 1 && mt.has_ec && !ecc && threadIdx.x == 0) ep = ec_epoch(mt.ec);
  {  // x rows [0, m), all of k_pad (zero beyond k)
    const int segs = p.kblocks * (kKBlock / 8);
    for (int i = threadIdx.x; i < p.m * segs; i += kThreads) {
      const int r = i / segs, cs = i - r * segs;
      stage_x_segment(xs + r * p.xs_stride + cs * 8, p.x, p.k, r, cs * 8, p.k, true, p.x_vec);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  if (kEc == 1 && mt.has_ec && threadIdx.x == 0) ec_ep = ep;
  consumers_sync();

  // ldmatrix rows: token rows >= m alias row 0 (computed, never stored).
  const int lrow = ldmatrix_row<1>(lane);
  const uint32_t xrow = smem_u32(xs) + uint32_t((lrow < p.m ? lrow : 0) * p.xs_stride * 2) + ((lane >> 3) & 1) * 16;
  if (ecc) {  // the slice's partial z into every peer, then on to the main loop (the cluster barrier's second phase)
    const int nkb = max(0, min(ec_cl_kblocks(p.kblocks, ecc), p.kblocks - ec_kb0));
    ec_cluster_partial(mt.ec, p.m, ec_kb0 * 4, nkb * 4, ec_as, ec_astride, xrow, reinterpret_cast<float4*>(ec_as),
                       ec_slots, ecc, ec_crank, consumers_sync);
    cluster_arrive_release();
  }
  float acc[1][4], part[1][4], part2[1][4] = {};  // part2: the second MMA chain of the specialised loop
  zero_accumulators<1>(acc, part);
  int grp = -1;  // the group whose parameters are loaded (grouped)
  auto fold = [&] {
    fold_group<1>(acc, part, sc_lo, sc_hi);
    fold_group<1>(acc, part2, sc_lo, sc_hi);
  };
  auto new_group = [&](int gi) {
    if (gi == grp) return;
    if (grp >= 0) fold();
    grp = gi;
    load_group_params(ss, zs, gi * 16 + g, sc_lo, sc_hi, nz_lo, nz_hi);
  };
  for (int c = 0; c < nchunks; ++c) {
    const int s = c % NS, kb0 = c * kBulkChunk, nkb = min(kBulkChunk, p.kblocks - kb0);
    mbar_wait(&full[s], unsigned(c / NS) & 1u);
    if (kMode != kAnyGroups && nkb == kBulkChunk) {  // both k-blocks' codes first, no bounds or group checks per step
      uint4 w[kRun];
#pragma unroll
      for (int jj = 0; jj < kRun; ++jj) w[jj] = ring[(s * kBulkChunk + warp * kRun + jj) * 32 + lane];
#pragma unroll
      for (int jj = 0; jj < kRun; ++jj) {
        const int kb = kb0 + warp * kRun + jj;
        if (kMode == kWholeKBlocks) new_group(min(kb * 4 / mt.group_steps, mt.groups - 1));
        const uint32_t ws[4] = {w[jj].x, w[jj].y, w[jj].z, w[jj].w};
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          uint32_t a[4], b0, b1;
          dequant_fragment(ws[st], nz_lo, nz_hi, a);
          ldmatrix_x2(xrow + uint32_t(kb) * (kKBlock * 2) + st * 32, b0, b1);
          mma_bf16(jj % 2 ? part2[0] : part[0], a, b0, b1);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
      continue;
    }
    // Each warp takes a run of kRun consecutive k-blocks of the stage: a group of 128 changes once per run.
    for (int jj = 0; jj < kRun; ++jj) {
      const int j = warp * kRun + jj;
      if (j >= nkb) break;
      const uint4 w = ring[(s * kBulkChunk + j) * 32 + lane];
      const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
      const int kb = kb0 + j;
      // Groups of >= 64 columns: one group per k-block (one division per k-block, not per k-step).
      const bool whole = gmax && mt.group_steps % 4 == 0;
      if (whole) new_group(min(kb * 4 / mt.group_steps, mt.groups - 1));
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        if (gmax && !whole) new_group(min((kb * 4 + st) / mt.group_steps, mt.groups - 1));
        uint32_t a[4], b0, b1;
        dequant_fragment(ws[st], nz_lo, nz_hi, a);
        ldmatrix_x2(xrow + uint32_t(kb) * (kKBlock * 2) + st * 32, b0, b1);
        mma_bf16(part[0], a, b0, b1);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  if (!gmax || grp >= 0) fold();
  const unsigned long long ec_pre = kEc == 1 && mt.has_ec && !ecc && !p.ec_w4_gate ? ec_gz_issue(mt.ec, p.m) : 0ull;
  red[warp * 32 + lane] = make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
  consumers_sync();
  if (ecc)
    named_sync(kBarGzReady, kBulkThreads);  // the producer warp's g ⊙ z
  else if (kEc == 1 && mt.has_ec && p.ec_w4_gate)
    ec_gate(mt.ec, ec_ep, p.m, eczs, eczt, echb, ecgs, consumers_sync);
  else if (kEc == 1 && mt.has_ec)
    ec_gz_wait(mt.ec, ec_ep, p.m, eczs, ec_pre, consumers_sync);
  if (warp == 0) {  // the CTA's sum in warp order, the epilogue
    float4 sum = red[lane];
    for (int q = 1; q < kWarps; ++q) {
      const float4 v = red[q * 32 + lane];
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    float b_lo = 0.f, b_hi = 0.f;
    if (mt.bias) {
      if (r_lo < mt.n) b_lo = __bfloat162float(mt.bias[r_lo]);
      if (r_hi < mt.n) b_hi = __bfloat162float(mt.bias[r_hi]);
    }
    const int tok = 2 * t;
    float e0 = 0.f, e1 = 0.f, e2 = 0.f, e3 = 0.f;  // B·(g ⊙ z) of (r_lo, tok), (r_lo, tok + 1), (r_hi, ...)
    if (kEc && mt.has_ec && tok < p.m) {
      const int r = mt.ec.rank;
      ec_terms(ecb + g * r, ecb + (g + 8) * r, eczs + tok * r, eczs + (tok + 1) * r, r, tok + 1 < p.m, e0, e1, e2, e3);
    }
    if (tok < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok) * mt.n;
      if (r_lo < mt.n) store_output(yr + r_lo, __float2bfloat16_rn(sum.x + b_lo + e0), p.fx.residual);
      if (r_hi < mt.n) store_output(yr + r_hi, __float2bfloat16_rn(sum.z + b_hi + e2), p.fx.residual);
    }
    if (tok + 1 < p.m) {
      __nv_bfloat16* yr = mt.y + size_t(tok + 1) * mt.n;
      if (r_lo < mt.n) store_output(yr + r_lo, __float2bfloat16_rn(sum.y + b_lo + e1), p.fx.residual);
      if (r_hi < mt.n) store_output(yr + r_hi, __float2bfloat16_rn(sum.w + b_hi + e3), p.fx.residual);
    }
    if (p.fx.swiglu_out) swiglu_pair_tail(p.fx, p.mat[0].y, p.mat[1].y, mt.n, p.m, tile, lane);
  }
  if (kEc == 1 && mt.has_ec && !ecc && threadIdx.x == 0)
    ec_leave(mt.ec, tile, mt.n_pad / 16);  // the EC's readers: the tiles
  if (p.fx.norm_out) {
    __shared__ int last;
    norm_tail(p.fx, p.mat[0].y, p.m, p.mat[0].n, gridDim.x - p.ec_cols, reinterpret_cast<float*>(red),
              &last, threadIdx.x, [] { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); });
  }
}

int bulk_stages(int kblocks) { return std::min(kBulkStages, (kblocks + kBulkChunk - 1) / kBulkChunk); }

int bulk_gmax(const W4Device* w, int count) {
  int gmax = 0;
  for (int i = 0; i < count; ++i)
    if (w[i].groups > 1) gmax = std::max(gmax, w[i].groups);
  return gmax;
}

}  // namespace

bool bulk_takes(int m, const W4Device* w, int count) {
  const DeviceFacts& dev = device_facts();
  if (dev.major < 9 || m < 1 || m > 8 || count < 1 || count > 4) return false;
  for (int i = 0; i < count; ++i) {
    if (w[i].k_pad != w[0].k_pad || w[i].k != w[0].k || w[i].n_pad % 16) return false;
    if (w[i].groups > 1 && (w[i].group_size % 16 || w[i].groups > kBulkMaxGroups)) return false;
  }
  const int kblocks = w[0].k_pad / kKBlock;
  const size_t smem = bulk_smem_bytes(m, kblocks, bulk_stages(kblocks), bulk_gmax(w, count));
  return smem + 1024 <= dev.smem_optin;  // 1 KB: the static mbarriers
}

namespace {

// A projection-only launch's W4 CTAs hold no EC state (as the plain launch's: the same occupancy). ECs in clusters
// (ec_cluster > 0) have no EC CTAs.
size_t bulk_launch_smem(int m, const W4Device* w, int count, const EcPlanInfo* ec, int ec_cluster = 0) {
  const int kblocks = w[0].k_pad / kKBlock;
  const bool w4_ec = ec && !ec->project;
  const size_t smem = bulk_smem_bytes(m, kblocks, bulk_stages(kblocks), bulk_gmax(w, count), w4_ec ? ec->rmax : 0,
                                      w4_ec ? ec->gmax : 0, w4_ec ? ec_cluster : 0);
  if (!ec || ec_cluster) return smem;
  return std::max(smem, ec_cta_smem_bytes(m, ec->cpr_max) + ec_finish_smem_bytes(m, ec->rmax, ec->gmax));
}

std::atomic<uint64_t> g_bulk_ec_launches{0};

using BulkKernel = void (*)(W4BulkParams);
// [DecodeGroupMode]
constexpr BulkKernel kBulkEcKernels[3] = {w4a16_bulk_kernel<1, 2, kPerChannel>,
                                          w4a16_bulk_kernel<1, 2, kWholeKBlocks>,
                                          w4a16_bulk_kernel<1, 2, kAnyGroups>};
constexpr BulkKernel kBulkPlainKernels[3][3] = {
    {w4a16_bulk_kernel<0, 2, kPerChannel>, w4a16_bulk_kernel<0, 3, kPerChannel>,
     w4a16_bulk_kernel<0, 4, kPerChannel>},
    {w4a16_bulk_kernel<0, 2, kWholeKBlocks>, w4a16_bulk_kernel<0, 3, kWholeKBlocks>,
     w4a16_bulk_kernel<0, 4, kWholeKBlocks>},
    {w4a16_bulk_kernel<0, 2, kAnyGroups>, w4a16_bulk_kernel<0, 3, kAnyGroups>,
     w4a16_bulk_kernel<0, 4, kAnyGroups>}};
// Projection-only launches (EC CTAs, plain W4 CTAs): built for 2, 3 and 4 CTAs per SM, chosen by occupancy as the
// plain ones, so that a launch of many tiles (the gate/up pair) keeps the plain launch's bytes in flight.
constexpr BulkKernel kBulkProjectKernels[3][3] = {
    {w4a16_bulk_kernel<3, 2, kPerChannel>, w4a16_bulk_kernel<3, 3, kPerChannel>, w4a16_bulk_kernel<3, 4, kPerChannel>},
    {w4a16_bulk_kernel<3, 2, kWholeKBlocks>, w4a16_bulk_kernel<3, 3, kWholeKBlocks>,
     w4a16_bulk_kernel<3, 4, kWholeKBlocks>},
    {w4a16_bulk_kernel<3, 2, kAnyGroups>, w4a16_bulk_kernel<3, 3, kAnyGroups>, w4a16_bulk_kernel<3, 4, kAnyGroups>}};
// Launches with ECs in clusters: the compensator instance (2 CTAs per SM), or one without the EC-CTA code built for 3
// or 4 (the registers of the EC-CTA path held the compensator instance at 2, which halved the bytes in flight of
// launches of many tiles, e.g. the fused gate/up launch).
constexpr BulkKernel kBulkClusterKernels[3][3] = {
    {kBulkEcKernels[0], w4a16_bulk_kernel<2, 3, kPerChannel>, w4a16_bulk_kernel<2, 4, kPerChannel>},
    {kBulkEcKernels[1], w4a16_bulk_kernel<2, 3, kWholeKBlocks>, w4a16_bulk_kernel<2, 4, kWholeKBlocks>},
    {kBulkEcKernels[2], w4a16_bulk_kernel<2, 3, kAnyGroups>, w4a16_bulk_kernel<2, 4, kAnyGroups>}};

// The instance of kinds[mode] (kind 1: kBulkClusterKernels, 2: kBulkProjectKernels, else kBulkPlainKernels) with the
// most CTAs per SM at `smem` dynamic bytes (the fewest spills among equals), cached per kind and KB of shared memory
// (the same on every device of a process).
BulkKernel bulk_occupancy_instance(int kind, size_t smem, int mode) {
  const BulkKernel(&kinds)[3][3] = kind == 1 ? kBulkClusterKernels : kind == 2 ? kBulkProjectKernels : kBulkPlainKernels;
  static std::atomic<int8_t> best[3][256];  // 0: not yet computed, else 1 + index into kinds[mode]
  const size_t kb = std::min<size_t>(255, (smem + 1023) / 1024);
  std::atomic<int8_t>& slot = best[kind][kb];
  int b = slot.load(std::memory_order_relaxed);
  if (b == 0) {
    int most = -1;
    for (int i = 0; i < 3; ++i) {
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kinds[kAnyGroups][i], kBulkThreads, smem) !=
          cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      if (per_sm > most) most = per_sm, b = i + 1;
    }
    if (b == 0) b = 1;
    slot.store(int8_t(b), std::memory_order_relaxed);
  }
  return kinds[mode][b - 1];
}

// The plain instance for a launch of `smem` dynamic bytes: by default the one with the most CTAs per SM (the fewest
// spills among equals), or as forced by W4GemmOptions::bulk_min_blocks (1: the compensator instance, which plain
// launches ran before the plain instances existed). Occupancies are cached per KB of shared memory (the same on
// every device of a process).
BulkKernel bulk_plain_instance(size_t smem, int forced, int mode) {
  if (forced == 1) return kBulkEcKernels[mode];
  if (forced >= 2 && forced <= 4) return kBulkPlainKernels[mode][forced - 2];
  return bulk_occupancy_instance(0, smem, mode);
}

}  // namespace

namespace {

// Whether clusters of C CTAs of this launch's instance fit the device (cudaOccupancyMaxActiveClusters), cached per C
// and KB of shared memory (the same on every device of a process).
bool bulk_clusters_fit(int C, size_t smem, int mode, int tiles) {
  static std::atomic<int8_t> fits[5][256];  // [log2 C - 1][KB]; 0: not yet known, 1: no, 2: yes
  const size_t kb = std::min<size_t>(255, (smem + 1023) / 1024);
  std::atomic<int8_t>& f = fits[std::min(4, __builtin_ctz(unsigned(C)) - 1)][kb];
  if (f.load(std::memory_order_relaxed) == 0) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(std::max(tiles, C)), 1, 1);
    cfg.blockDim = dim3(kBulkThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = unsigned(C);
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, bulk_occupancy_instance(1, smem, mode), &cfg) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      clusters = 0;
    }
    f.store(clusters > 0 ? 2 : 1, std::memory_order_relaxed);
  }
  return f.load(std::memory_order_relaxed) == 2;
}

// ECs in clusters of C W4 CTAs (w4a16_ec_cluster.cuh): every matrix's tiles whole clusters (a cluster is one
// matrix's), ranks within the four row tiles of the partial sum, and the clusters fit; any number of waves.
bool bulk_cluster_ec_takes(int m, const W4Device* w, int count, const EcPlanInfo& ec, int C) {
  if (C == 0 || ec.project || ec.rmax > 64 || device_facts().major < 9 || !bulk_takes(m, w, count)) return false;
  int tiles = 0;
  for (int i = 0; i < count; ++i) {
    if ((w[i].n_pad / 16) % C) return false;
    tiles += w[i].n_pad / 16;
  }
  const size_t smem = bulk_launch_smem(m, w, count, &ec, C);
  return smem + 1024 <= device_facts().smem_optin && bulk_clusters_fit(C, smem, group_mode(w, count), tiles);
}

}  // namespace

bool bulk_ec_takes(int m, const W4Device* w, int count, const EcPlanInfo& ec, int sm_count, int ec_w4_gate) {
  if (ec_cluster_size(ec_w4_gate)) return bulk_cluster_ec_takes(m, w, count, ec, ec_cluster_size(ec_w4_gate));
  if (!bulk_takes(m, w, count)) return false;
  const size_t smem = bulk_launch_smem(m, w, count, &ec);
  if (smem + 1024 > device_facts().smem_optin) return false;
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kBulkEcKernels[group_mode(w, count)], kBulkThreads,
                                                    smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  long ctas = ec.cols(1);
  for (int i = 0; i < count; ++i) ctas += w[i].n_pad / 16;
  return per_sm >= 1 && ctas <= long(per_sm) * sm_count;
}

void set_bulk_max_smem(int bytes) {
  for (const auto& per_mode : kBulkClusterKernels)
    for (BulkKernel k : per_mode) {
      SPEAR_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes - 1024));
      // Clusters of 16 (the in-cluster EC's larger size); a device without them rejects those plans.
      if (cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
        (void)cudaGetLastError();
    }
  for (int mode = 0; mode < 3; ++mode)
    for (int i = 0; i < 3; ++i)
      for (BulkKernel k : {kBulkPlainKernels[mode][i], kBulkProjectKernels[mode][i]})
        SPEAR_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes - 1024));
}

bool bulk_project_takes(int m, const W4Device* w, int count, const EcPlanInfo& ec) {
  return ec.project && bulk_takes(m, w, count) && bulk_launch_smem(m, w, count, &ec) + 1024 <= device_facts().smem_optin;
}

void launch_bulk(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                 __nv_bfloat16* const* y, const W4GemmOptions& o, cudaStream_t stream, const W4Fusion* fusion,
                 const W4EcDevice* const* ec, const EcPlanInfo* ec_info, int ec_w4_gate, float* const* ec_z) {
  W4BulkParams p{};
  p.count = count;
  p.x = x;
  p.m = m;
  p.k = w[0].k;
  p.kblocks = w[0].k_pad / kKBlock;
  p.stages = bulk_stages(p.kblocks);
  p.xs_stride = p.kblocks * kKBlock + 8;
  p.x_vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0 && w[0].k % 8 == 0;
  p.fx = fuse_of(fusion);
  const int ec_cluster = ec && ec_info && !ec_info->project ? ec_cluster_size(ec_w4_gate) : 0;
  if (ec && ec_info) {  // EC CTAs first, one k-slice each (none when the ECs run in clusters)
    for (int i = 0; i < count; ++i) {
      if (!ec[i]) continue;
      p.mat[i].has_ec = 1;
      p.mat[i].ec = dec_ec_of(*ec[i], p.k, ec_info->base_slices[i], 1, p.ec_cols);
      if (!ec_cluster) p.ec_cols += p.mat[i].ec.cols;
    }
    p.ec_cluster = ec_cluster;
    p.ec_rmax = ec_info->rmax;
    p.ec_gmax = ec_info->gmax;
    p.ec_w4_gate = ec_w4_gate;
    if (ec_info->project) {  // the W4 CTAs run plain (no EC state); each EC writes z (or g ⊙ z) to ec_z[i]
      p.ec_project = ec_info->project_gated ? 2 : 1;
      p.ec_rmax = p.ec_gmax = 0;
      for (int i = 0; i < count; ++i) {
        p.mat[i].has_ec = 0;
        if (ec[i]) p.mat[i].ec.zout = ec_z[i];
      }
    }
  }
  int tiles = p.ec_cols;
  for (int i = 0; i < count; ++i) {
    W4BulkMat& d = p.mat[i];
    d.q = reinterpret_cast<const uint4*>(w[i].q);
    d.scales = w[i].scales;
    d.zeros = w[i].zeros;
    d.bias = bias ? bias[i] : nullptr;
    d.y = y[i];
    d.n = w[i].n;
    d.n_pad = w[i].n_pad;
    d.groups = w[i].groups;
    d.group_steps = w[i].groups > 1 ? w[i].group_size / 16 : 0;
    d.tile_begin = tiles;
    tiles += w[i].n_pad / 16;
  }
  const size_t smem = bulk_launch_smem(m, w, count, ec && ec_info ? ec_info : nullptr, ec_cluster);
  const bool pdl = o.pdl && device_facts().major >= 9;
  const int mode = group_mode(w, count);
  const bool with_ec = p.ec_cols || ec_cluster;
  const BulkKernel kernel = ec_cluster     ? bulk_occupancy_instance(1, smem, mode)
                            : p.ec_project ? bulk_occupancy_instance(2, smem, mode)
                            : with_ec      ? kBulkEcKernels[mode]
                                           : bulk_plain_instance(smem, o.bulk_min_blocks, mode);
  launch(kernel, dim3(tiles, 1), smem, 1, pdl, stream, p, kBulkThreads, ec_cluster);
  if (with_ec) g_bulk_ec_launches.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace w4_detail

uint64_t w4a16_bulk_ec_launches() { return w4_detail::g_bulk_ec_launches.load(std::memory_order_relaxed); }

}  // namespace spear::cuda
