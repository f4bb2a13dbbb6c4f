// The fused decode MLP block (mlp_fused.h). Layout of the work: CTA c of G (one per SM) owns gate/up tiles
// c, c + G, ... (a "B task": gate tile t then up tile t, 16 rows each) and down tiles c, c + G, ... (C tasks),
// processed in that order as a list of jobs (one matrix tile over all of k each). The producer warp streams the
// codes of every job of the list, in order, through a ring of 8 KB chunks as deep as the shared memory allows
// (mbarrier full / empty pairs, as w4a16_decode_bulk.cu); it never waits for activations, so the down tiles' codes
// arrive while the CTA still works on gate/up or waits for the other CTAs. The 16 consumer warps take one k-block
// of each chunk apiece; after each tile they sum their partials in shared memory and warp 0 writes the result.
//
// Status (H200, bench/results/cuda-h200-fusedmlp): exact, but 13-16% slower end to end than the op-by-op kernels
// at batch 1, bound by the consumers' instruction issue (the per-tile CTA-wide sum and warp 0's serial epilogue,
// ~50 instructions per MMA k-step), not by memory; so the backend runs it only on request (SPEAR_FUSED_MLP=1).
//
// Synchronisation (global counters, left at zero by the last CTA to finish):
//   [0] CTAs that have read x for the norm (C tasks overwrite x: they wait for all G),
//   [1] CTAs whose SiLU(g) ⊙ u columns are all written (C tasks stage all of a: they wait for all),
//   [2] CTAs done (the last one zeroes the counters for the next launch).
// A CTA waits only after it has run: all G CTAs must be resident at once, so the grid is one CTA per SM with
// shared memory that allows no second one, and the next kernel is let in (PDL) only after this CTA's waits.
#include <algorithm>

#include "backend/cuda/mlp_fused.h"
#include "backend/cuda/w4a16_internal.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

using namespace w4_detail;
using bf16 = __nv_bfloat16;

constexpr int kChunk = 16;      // k-blocks per ring stage (8 KB of codes)
constexpr int kMaxStages = 32;  // ring stages: as many as the shared memory left holds
// 16 consumer warps, one k-block of each chunk apiece: with 8 (the bulk-copy kernel's count, one CTA per SM) the
// SM issued 0.28 instructions per cycle and scheduler, stalled on the MMA chains (ncu: 41 us for the 1B block).
constexpr int kCWarps = 16;
constexpr int kCThreads = kCWarps * 32;
constexpr int kNormThreads = 256;            // phase A in rms_norm.cu's order (its block of 256 threads)
constexpr int kMlpThreads = kCThreads + 32;  // the consumers + the producer warp
static_assert(kChunk == kCWarps, "one k-block per consumer warp and stage");
constexpr int kMaxTokens = 8;
constexpr int kMaxGroups = 256;

struct MlpMat {
  const uint4* q;
  const float* scales;
  const uint16_t* zeros;
  int n, n_pad, kblocks, groups, group_steps;  // group_steps: k-steps of 16 per group (0: per channel)
};

struct MlpParams {
  MlpMat mat[3];  // gate, up, down
  bf16* x;
  const bf16* add;
  const bf16* norm_w;
  bf16* act;
  unsigned* counters;
  float eps;
  int m, hidden, inter;   // hidden = gate.k = down.n, inter = gate.n = down.k
  int nb, nc;             // gate/up tiles, down tiles
  int xs_stride, gslots;  // bf16 per staged row; scale slots per parameter buffer (>= 1)
  int stages;             // ring stages (<= kMaxStages)
  // Group index of k-step ks of matrix i: (ks · gmul[i]) >> 20, gmul = ceil(2^20 / group_steps) (exact for
  // ks < 2^20 / 15 with up to 16 k-steps per group, far beyond any k here).
  unsigned gmul[3];
  int b_ctas;  // CTAs with gate/up tiles: min(G, nb)
};

// Shared memory besides the ring: x / a rows, two parameter buffers, two reduction buffers, the saved gate tile.
size_t fixed_smem_bytes(int m, int xs_stride, int gslots) {
  return align_up(size_t(m) * xs_stride * 2, 16) + 2 * size_t(gslots) * 16 * 6 + 2 * size_t(kCWarps) * 32 * 16 +
         32 * 16;
}
constexpr size_t kStageBytes = size_t(kChunk) * 512;
// One CTA streams for a whole SM: the ring gets the shared memory the rest leaves (8 stages at least: 64 KB in
// flight per SM streams at about half the HBM rate on the H200, the bulk-copy kernel's measurements).
int ring_stages(size_t fixed, size_t budget) {
  return budget > fixed ? int(std::min<size_t>(kMaxStages, (budget - fixed) / kStageBytes)) : 0;
}

__device__ __forceinline__ void consumer_bar() { asm volatile("bar.sync 1, %0;" ::"n"(kCThreads) : "memory"); }

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The consumers' block sum, in rms_norm.cu's order (row_norm::block_sum<256>) but on the consumers' barrier.
__device__ __forceinline__ float consumer_sum(float v, float* sums) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) sums[warp] = v;
  consumer_bar();
  if (warp == 0) {
    // Warps 8..15 add zeros (they take no part in the norm): the same sums as 8 warps.
    float t = lane < kCWarps ? sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) sums[kCWarps] = t;
  }
  consumer_bar();
  return sums[kCWarps];
}

// Job j of this CTA: {matrix, tile}. Jobs [0, 2·nbj) alternate gate / up of the CTA's B tasks, then its C tasks.
struct Job {
  int mat, tile;
};
__device__ __forceinline__ Job job_at(int j, int nbj) {
  const int c = blockIdx.x, G = gridDim.x;
  if (j < 2 * nbj) return {j & 1, c + (j >> 1) * G};
  return {2, c + (j - 2 * nbj) * G};
}

__global__ void __launch_bounds__(kMlpThreads, 1) mlp_fused_kernel(const __grid_constant__ MlpParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[kMaxStages], empty[kMaxStages];
  __shared__ float sums[kCWarps + 1];
  const int NS = p.stages;
  uint4* ring = reinterpret_cast<uint4*>(smem);  // [NS][kChunk][32]
  bf16* xs = reinterpret_cast<bf16*>(ring + NS * kChunk * 32);
  float* ss = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(xs) +
                                       ((size_t(p.m) * p.xs_stride * 2 + 15) & ~size_t(15)));  // [2][gslots][16]
  uint16_t* zs = reinterpret_cast<uint16_t*>(ss + 2 * p.gslots * 16);                          // [2][gslots][16]
  float4* red = reinterpret_cast<float4*>(zs + 2 * p.gslots * 16);                             // [2][16][32]
  float4* gsave = red + 2 * kCWarps * 32;                                                      // [32]
  const int G = gridDim.x, c = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
  const int nbj = c < p.nb ? (p.nb - 1 - c) / G + 1 : 0;
  const int ncj = c < p.nc ? (p.nc - 1 - c) / G + 1 : 0;
  const int jobs = 2 * nbj + ncj;

  if (tid == 0) {
    for (int i = 0; i < NS; ++i) mbar_init(&full[i], 1), mbar_init(&empty[i], kCWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kCWarps) {  // the producer: every job's codes, in order, as the ring frees up
    if (lane == 0) {
      const uint64_t pol = evict_first_policy();
      int cg = 0;
      for (int j = 0; j < jobs; ++j) {
        const Job jb = job_at(j, nbj);
        const MlpMat& mt = p.mat[jb.mat];
        const uint4* src = mt.q + size_t(jb.tile) * mt.kblocks * 32;
        for (int kb0 = 0; kb0 < mt.kblocks; kb0 += kChunk, ++cg) {
          const int s = cg % NS;
          if (cg >= NS) mbar_wait(&empty[s], unsigned(cg / NS - 1) & 1u);
          const unsigned bytes = unsigned(min(kChunk, mt.kblocks - kb0)) * 512u;
          mbar_expect_tx(&full[s], bytes);
          bulk_copy_to_shared(ring + s * kChunk * 32, src + size_t(kb0) * 32, bytes, &full[s], pol);
        }
      }
    }
    return;
  }

  // Consumers. A job's scales / zero points (per channel: one slot) land in parameter buffer j & 1 while job
  // j - 1 runs.
  const int g = lane >> 2, t = lane & 3;
  auto stage_params = [&](int j) {
    if (j < jobs) {
      const Job jb = job_at(j, nbj);
      const MlpMat& mt = p.mat[jb.mat];
      const int gs = mt.group_steps ? mt.groups : 1, buf = j & 1;
      float* sd = ss + buf * p.gslots * 16;
      uint16_t* zd = zs + buf * p.gslots * 16;
      for (int i = tid; i < gs * 4; i += kCThreads)
        cp_async16(smem_u32(sd + i * 4), mt.scales + size_t(i / 4) * mt.n_pad + jb.tile * 16 + (i % 4) * 4, true);
      for (int i = tid; i < gs * 2; i += kCThreads)
        cp_async16(smem_u32(zd + i * 8), mt.zeros + size_t(i / 2) * mt.n_pad + jb.tile * 16 + (i % 2) * 8, true);
    }
    cp_async_commit();
  };
  stage_params(0);
  pdl_wait();

  // Phase A: xs = RMSNorm(x + add) · w for the m rows (rms_norm.cu's order: 8 bf16 per access, thread t takes
  // the groups t, t + 256, ...), zero beyond hidden.
  const int hidden = p.hidden, hv = hidden / 8;
  for (int r = 0; r < p.m; ++r) {
    const uint4* xr = reinterpret_cast<const uint4*>(p.x + size_t(r) * hidden);
    const uint4* ar = p.add ? reinterpret_cast<const uint4*>(p.add + size_t(r) * hidden) : nullptr;
    auto sum_row = [&](int gi, float(&f)[8]) {
      uint4 a = xr[gi];
      __nv_bfloat162* ah = reinterpret_cast<__nv_bfloat162*>(&a);
      if (ar) {
        const uint4 b = ar[gi];
        const __nv_bfloat162* bh = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 fa = __bfloat1622float2(ah[e]), fb = __bfloat1622float2(bh[e]);
          ah[e] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f2 = __bfloat1622float2(ah[e]);
        f[2 * e] = f2.x, f[2 * e + 1] = f2.y;
      }
    };
    float sq = 0.f;
    for (int gi = tid; tid < kNormThreads && gi < hv; gi += kNormThreads) {
      float f[8];
      sum_row(gi, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) sq += f[e] * f[e];
    }
    const float inv = rsqrtf(consumer_sum(sq, sums) / float(hidden) + p.eps);
    for (int gi = tid; gi < hv; gi += kCThreads) {
      float f[8];
      sum_row(gi, f);
      const uint4 wv = reinterpret_cast<const uint4*>(p.norm_w)[gi];
      const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv);
      uint4 o;
      __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 b = __bfloat1622float2(wh[e]);
        oh[e] = __floats2bfloat162_rn(b.x * (f[2 * e] * inv), b.y * (f[2 * e + 1] * inv));
      }
      *reinterpret_cast<uint4*>(xs + r * p.xs_stride + gi * 8) = o;
    }
    for (int k = hidden + tid; k < p.mat[0].kblocks * kKBlock; k += kCThreads) xs[r * p.xs_stride + k] = bf16(0.f);
  }
  consumer_bar();
  if (tid == 0) {
    __threadfence();
    atomicAdd(p.counters, 1u);  // this CTA has read x
  }

  const int lrow = ldmatrix_row<1>(lane);
  const uint32_t xrow = smem_u32(xs) + uint32_t((lrow < p.m ? lrow : 0) * p.xs_stride * 2) + ((lane >> 3) & 1) * 16;
  int cg = 0;  // ring chunk counter, in step with the producer
  for (int j = 0; j < jobs; ++j) {
    const Job jb = job_at(j, nbj);
    const MlpMat& mt = p.mat[jb.mat];
    const int buf = j & 1;
    cp_async_wait<0>();
    consumer_bar();  // job j's parameters are in; every warp is done with buffer buf ^ 1 (job j - 1)
    stage_params(j + 1);
    if (j == 2 * nbj) {  // the first C task: all of a written, every CTA past its read of x
      pdl_launch_dependents();
      if (tid == 0) {
        while (ld_acquire(p.counters + 1) < unsigned(p.b_ctas) || ld_acquire(p.counters) < unsigned(G)) {
        }
      }
      consumer_bar();
      const int segs = p.mat[2].kblocks * (kKBlock / 8), inter = p.inter;
      for (int i = tid; i < p.m * segs; i += kCThreads) {
        const int r = i / segs, col = (i - r * segs) * 8;
        const bool ok = col < inter;  // inter % 8 == 0: a segment is wholly inside or outside
        cp_async16(smem_u32(xs + r * p.xs_stride + col), ok ? p.act + size_t(r) * inter + col : p.act, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      consumer_bar();
    }
    const float* sb = ss + buf * p.gslots * 16;
    const uint16_t* zb = zs + buf * p.gslots * 16;
    // Two MMA chains (even / odd k-steps) halve the dependent latency; a group's sums fold into acc at its end.
    float acc[1][4], part[2][1][4];
    zero_accumulators<1>(acc, part[0]);
    zero_accumulators<1>(acc, part[1]);
    float sc_lo = 0.f, sc_hi = 0.f;
    uint32_t nz_lo = 0, nz_hi = 0;
    int grp = -1;
    const int gsteps = mt.group_steps;
    const unsigned gmul = p.gmul[jb.mat];
    if (!gsteps) load_group_params(sb, zb, g, sc_lo, sc_hi, nz_lo, nz_hi);
    auto fold = [&] {
      fold_group<1>(acc, part[0], sc_lo, sc_hi);
      fold_group<1>(acc, part[1], sc_lo, sc_hi);
    };
    auto new_group = [&](unsigned ks) {
      const int gi = min(int((ks * gmul) >> 20), mt.groups - 1);
      if (gi == grp) return;
      if (grp >= 0) fold();
      grp = gi;
      load_group_params(sb, zb, gi * 16 + g, sc_lo, sc_hi, nz_lo, nz_hi);
    };
    const bool whole = gsteps && gsteps % 4 == 0;  // one group per k-block
    for (int kb0 = 0; kb0 < mt.kblocks; kb0 += kChunk, ++cg) {
      const int s = cg % NS, kb = kb0 + warp;
      mbar_wait(&full[s], unsigned(cg / NS) & 1u);
      if (kb < mt.kblocks) {
        const uint4 w = ring[(s * kChunk + warp) * 32 + lane];
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
        if (whole) new_group(unsigned(kb) * 4u);
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          if (gsteps && !whole) new_group(unsigned(kb) * 4u + unsigned(st));
          uint32_t a[4], b0, b1;
          dequant_fragment(ws[st], nz_lo, nz_hi, a);
          ldmatrix_x2(xrow + uint32_t(kb) * (kKBlock * 2) + st * 32, b0, b1);
          mma_bf16(part[st & 1][0], a, b0, b1);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
    }
    if (!gsteps || grp >= 0) fold();
    float4* rb = red + buf * kCWarps * 32;
    rb[warp * 32 + lane] = make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
    consumer_bar();
    if (warp != 0) continue;
    float4 sum = rb[lane];
    for (int q = 1; q < kCWarps; ++q) {
      const float4 v = rb[q * 32 + lane];
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    // sum: {token 2t, row g}, {token 2t + 1, row g}, {token 2t, row g + 8}, {token 2t + 1, row g + 8}
    const int r_lo = jb.tile * 16 + g, r_hi = r_lo + 8;
    const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
    if (jb.mat == 0) {
      gsave[lane] = sum;
      continue;
    }
    if (jb.mat == 1) {  // a = SiLU(g) ⊙ u, with g and u rounded to bf16 as the GEMM outputs are
      const float4 gv = gsave[lane];
      const float gvals[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
        if (tok >= p.m || row >= p.inter) continue;
        const float gf = __bfloat162float(__float2bfloat16_rn(gvals[e]));
        const float uf = __bfloat162float(__float2bfloat16_rn(vals[e]));
        p.act[size_t(tok) * p.inter + row] = __float2bfloat16_rn(gf / (1.f + expf(-gf)) * uf);
      }
      if (j == 2 * nbj - 1) {  // the CTA's last gate/up tile: its columns of a are out (one release per CTA)
        __threadfence();
        __syncwarp();
        if (lane == 0) atomicAdd(p.counters + 1, 1u);
      }
      continue;
    }
    // Down: x ← (x + add) + down, each rounded to bf16 as add_bf16 / the GEMM output do.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
      if (tok >= p.m || row >= p.hidden) continue;
      const size_t i = size_t(tok) * p.hidden + row;
      float x1 = __bfloat162float(p.x[i]);
      if (p.add) x1 = __bfloat162float(__float2bfloat16_rn(x1 + __bfloat162float(p.add[i])));
      p.x[i] = __float2bfloat16_rn(x1 + __bfloat162float(__float2bfloat16_rn(vals[e])));
    }
  }
  if (ncj == 0) pdl_launch_dependents();
  consumer_bar();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(p.counters + 2, 1u) == unsigned(G) - 1) {  // everyone is past its waits
      p.counters[0] = p.counters[1] = p.counters[2] = 0;
      __threadfence();
    }
  }
}

// The CTA's shared memory for m tokens: staged rows, parameter slots, and the ring in what is left.
struct SmemPlan {
  int xs_stride, gslots, stages;
  size_t bytes;
};
SmemPlan smem_plan(int m, const W4Device& gate, const W4Device& up, const W4Device& down) {
  SmemPlan s;
  s.xs_stride = std::max(gate.k_pad, down.k_pad) + 8;
  s.gslots = std::max({gate.groups, up.groups, down.groups, 1});
  const size_t fixed = fixed_smem_bytes(m, s.xs_stride, s.gslots);
  s.stages = ring_stages(fixed, device_facts().smem_optin - 1024);
  s.bytes = fixed + size_t(s.stages) * kStageBytes;
  return s;
}

int group_steps(const W4Device& w) { return w.groups > 1 ? w.group_size / 16 : 0; }

}  // namespace

bool fused_mlp_supported(int m, const W4Device& gate, const W4Device& up, const W4Device& down) {
  if (device_facts().major < 9 || m < 1 || m > kMaxTokens) return false;
  const int hidden = gate.k, inter = gate.n;
  if (hidden % 8 || inter % 8 || up.n != inter || up.k != hidden || up.k_pad != gate.k_pad || up.n_pad != gate.n_pad ||
      down.n != hidden || down.k != inter || down.n_pad % 16 || gate.n_pad % 16)
    return false;
  for (const W4Device* w : {&gate, &up, &down})
    if (!w->q || (w->groups > 1 && (w->group_size % 16 || w->groups > kMaxGroups ||
                                    // the group index by multiplication (MlpParams::gmul) stays exact
                                    int64_t(w->k_pad / 16) * (w->group_size / 16 - 1) >= (int64_t(1) << 20))))
      return false;
  return smem_plan(m, gate, up, down).stages >= 8;
}

namespace w4_detail {
void set_mlp_fused_max_smem(int bytes) {
  SPEAR_CUDA_CHECK(cudaFuncSetAttribute(mlp_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes - 1024));
}
}  // namespace w4_detail

void fused_mlp_decode(const FusedMlpArgs& a, cudaStream_t stream) {
  SPEAR_CHECK(fused_mlp_supported(a.m, a.gate, a.up, a.down), "fused_mlp_decode: unsupported shapes (m {}, {}x{})", a.m,
              a.gate.n, a.gate.k);
  SPEAR_CHECK(a.x && a.norm_w && a.act && a.counters && a.sm_count >= 1,
              "fused_mlp_decode: null x, norm weights, act or counters, or no SM count");
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  SPEAR_CHECK(aligned(a.x) && aligned(a.norm_w) && aligned(a.act) && (!a.add || aligned(a.add)),
              "fused_mlp_decode: x, add, norm weights and act must be 16-byte aligned");
  MlpParams p{};
  const W4Device* ws[3] = {&a.gate, &a.up, &a.down};
  for (int i = 0; i < 3; ++i) {
    const W4Device& w = *ws[i];
    p.mat[i] = {reinterpret_cast<const uint4*>(w.q),
                w.scales,
                w.zeros,
                w.n,
                w.n_pad,
                w.k_pad / kKBlock,
                w.groups,
                group_steps(w)};
  }
  p.x = a.x;
  p.add = a.add;
  p.norm_w = a.norm_w;
  p.act = a.act;
  p.counters = a.counters;
  p.eps = a.eps;
  p.m = a.m;
  p.hidden = a.gate.k;
  p.inter = a.gate.n;
  p.nb = a.gate.n_pad / 16;
  p.nc = a.down.n_pad / 16;
  // The ring takes what the rest leaves of the opt-in shared memory: also more than half an SM's, so never two
  // CTAs share an SM, whatever else is resident when they start.
  const SmemPlan sp = smem_plan(a.m, a.gate, a.up, a.down);
  p.xs_stride = sp.xs_stride;
  p.gslots = sp.gslots;
  p.stages = sp.stages;
  for (int i = 0; i < 3; ++i)
    p.gmul[i] =
        p.mat[i].group_steps ? ((1u << 20) + unsigned(p.mat[i].group_steps) - 1) / unsigned(p.mat[i].group_steps) : 0;
  p.b_ctas = std::min(a.sm_count, p.nb);
  const bool pdl = w4a16_get_options().pdl;
  launch(mlp_fused_kernel, dim3(unsigned(a.sm_count)), sp.bytes, 1, pdl, stream, p, kMlpThreads);
}

}  // namespace spear::cuda
