// Kernel playground (llm.c dev/cuda style, not part of the build): what do the decode kernel's parts cost on top
// of its weight stream? w4_stream_lab.cu showed the bare stream + dequantization + MMA at ~12 µs on the 8B down
// matrix where the real kernel takes ~18 µs back to back. Each variant here adds one part of the real kernel
// (T = 1, per channel, two MMA chains, 3 CTAs per SM as the real instance), timed back to back with CUDA events
// over rotating copies (> 4 × L2):
//   base      the stream, x read from a zeroed static tile (w4_stream_lab's mma2)
//   +x        x staged from global memory (cp.async, wait, __syncthreads) after the ring is filled
//   +x+cta    and the CTA's k-slices summed in shared memory, one partial per CTA stored (no cross-CTA sum)
//   +x+ws     and the S CTAs of a tile summed through a global workspace: the last to arrive (a per-tile counter)
//             adds the S partials in order (deterministic, no cluster)
//   +x+clu    and the S CTAs summed through distributed shared memory in a cluster of S (the real kernel)
//   stream    persistent: 3 CTAs per SM, the matrix's k-blocks (tile-major, contiguous) cut evenly over all warps,
//             one long ring per warp; x (one row, all of k) staged per CTA; a partial stored at each tile change
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Isrc dev/cuda/w4_decode_cost_lab.cu -o /tmp/costlab && /tmp/costlab
#include <cooperative_groups.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/cuda/w4a16_common.cuh"

#include "common.h"

using namespace spear::cuda::w4_detail;
namespace cg = cooperative_groups;

constexpr int P = 8;
struct Args {
  const uint4* q;
  const __nv_bfloat16* x;
  float4* ws;
  unsigned* counters;
  __nv_bfloat16* y;
  int n_tiles, kblocks, R, kbw, S;
};

// kRed: 0 none, 1 CTA sum, 2 CTA sum + workspace fixup, 3 CTA sum + cluster sum.
template <bool kStageX, int kRed>
__global__ void __launch_bounds__(256, 3) part_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(16) __nv_bfloat16 xz[8][72];
  __shared__ float4 cred[8 * 32];
  float4* red = reinterpret_cast<float4*>(smem);  // [8][32]
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(red + 8 * 32);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int KS = 8 / a.R, rsub = warp % a.R, ks = warp / a.R;
  const int tile = blockIdx.x * a.R + rsub;
  const int cta_kb0 = blockIdx.y * KS * a.kbw, cta_kb1 = min(a.kblocks, cta_kb0 + KS * a.kbw);
  const int kb0 = cta_kb0 + ks * a.kbw, kb1 = min(cta_kb1, kb0 + a.kbw);
  const bool active = tile < a.n_tiles && kb0 < kb1;
  const uint64_t pol = evict_first_policy();
  const uint4* wq = a.q + size_t(active ? tile : 0) * a.kblocks * 32 + lane;
  uint4 ring[P];
  fill_weight_ring(ring, wq, kb0, kb1, active, pol);
  if (threadIdx.x < 8 * 72 / 8) reinterpret_cast<uint4*>(xz)[threadIdx.x] = make_uint4(0, 0, 0, 0);
  if constexpr (kStageX) {
    const int segs = (cta_kb1 - cta_kb0) * 8;
    for (int i = threadIdx.x; i < segs; i += 256) cp_async16(smem_u32(xs + i * 8), a.x + cta_kb0 * 64 + i * 8, true);
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();
  float c[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  const uint32_t xa = kStageX ? smem_u32(xs) + ((lane >> 3) & 1) * 16 : smem_u32(&xz[lane & 7][((lane >> 3) & 1) * 8]);
  if (active) {
    for (int kb = kb0; kb < kb1; kb += P) {
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int b = kb + i;
        if (b < kb1) {
          const uint32_t ws4[4] = {ring[i].x, ring[i].y, ring[i].z, ring[i].w};
          const uint32_t ko = kStageX ? uint32_t(b - cta_kb0) * 128 : 0;
#pragma unroll
          for (int st = 0; st < 4; ++st) {
            uint32_t f[4], b0, b1;
            dequant_fragment(ws4[st], 0xC300C300u, 0xC300C300u, f);
            ldmatrix_x2(xa + ko + st * 32, b0, b1);
            mma_bf16(c[st & 1], f, b0, b1);
          }
          if (b + P < kb1) ring[i] = ld_weights(wq + size_t(b + P) * 32, pol);
        }
      }
    }
  }
  float4 v = make_float4(c[0][0] + c[1][0], c[0][1] + c[1][1], c[0][2] + c[1][2], c[0][3] + c[1][3]);
  if constexpr (kRed == 0) {
    if (v.x == 1234.5f) a.y[0] = __float2bfloat16(v.y);
    return;
  }
  red[warp * 32 + lane] = v;
  __syncthreads();
  if (ks != 0 || tile >= a.n_tiles) {
    if constexpr (kRed == 3) {
      cg::this_cluster().sync();
      cg::this_cluster().sync();
    }
    return;
  }
  float4 s = red[rsub * 32 + lane];
  for (int qq = 1; qq < KS; ++qq) {
    const float4 u = red[(qq * a.R + rsub) * 32 + lane];
    s.x += u.x, s.y += u.y, s.z += u.z, s.w += u.w;
  }
  auto store = [&](const float4& r) {
    const int g = lane >> 2;
    a.y[size_t(tile) * 16 + g] = __float2bfloat16(r.x);
    a.y[size_t(tile) * 16 + g + 8] = __float2bfloat16(r.z);
  };
  if constexpr (kRed == 1) {
    a.ws[(size_t(blockIdx.y) * a.n_tiles + tile) * 32 + lane] = s;
  } else if constexpr (kRed == 2) {
    if (a.S == 1) {
      store(s);
      return;
    }
    a.ws[(size_t(blockIdx.y) * a.n_tiles + tile) * 32 + lane] = s;
    __threadfence();
    unsigned last = 0;
    if (lane == 0) last = atomicAdd(a.counters + tile, 1u) == unsigned(a.S - 1);
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    float4 t = a.ws[size_t(tile) * 32 + lane];
    for (int r = 1; r < a.S; ++r) {
      const float4 u = __ldcg(&a.ws[(size_t(r) * a.n_tiles + tile) * 32 + lane]);
      t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
    }
    store(t);
    if (lane == 0) a.counters[tile] = 0;
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cred[rsub * 32 + lane] = s;
    cl.sync();
    if (cl.block_rank() == 0) {
      float4 t = make_float4(0, 0, 0, 0);
      for (int r = 0; r < a.S; ++r) {
        const float4 u = *cl.map_shared_rank(cred + rsub * 32 + lane, r);
        t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
      }
      store(t);
    }
    cl.sync();
  }
}

// Persistent stream: warp w of W takes k-blocks [w·U/W, (w+1)·U/W) of the tile-major matrix (U = tiles · kblocks).
__global__ void __launch_bounds__(256, 3) stream_kernel(const __grid_constant__ Args a, int k) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long U = long(a.n_tiles) * a.kblocks, W = long(gridDim.x) * 8, w = long(blockIdx.x) * 8 + warp;
  const long u0 = w * U / W, u1 = (w + 1) * U / W;
  const uint64_t pol = evict_first_policy();
  const uint4* wq = a.q + lane;
  uint4 ring[P];
#pragma unroll
  for (int i = 0; i < P; ++i) ring[i] = u0 + i < u1 ? ld_weights(wq + size_t(u0 + i) * 32, pol) : make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i < k / 8; i += 256) cp_async16(smem_u32(xs + i * 8), a.x + i * 8, true);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const uint32_t xa = smem_u32(xs) + ((lane >> 3) & 1) * 16;
  float c[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  int kb = int(u0 % a.kblocks);
  long slot = w * 4;
  for (long u = u0; u < u1; u += P) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const long b = u + i;
      if (b < u1) {
        if (kb == a.kblocks) {  // tile change: store the partial, start the next tile
          a.ws[(slot++) * 32 + lane] = make_float4(c[0][0] + c[1][0], c[0][1] + c[1][1], c[0][2] + c[1][2], c[0][3] + c[1][3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) c[0][e] = c[1][e] = 0.f;
          kb = 0;
        }
        const uint32_t ws4[4] = {ring[i].x, ring[i].y, ring[i].z, ring[i].w};
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          uint32_t f[4], b0, b1;
          dequant_fragment(ws4[st], 0xC300C300u, 0xC300C300u, f);
          ldmatrix_x2(xa + kb * 128 + st * 32, b0, b1);
          mma_bf16(c[st & 1], f, b0, b1);
        }
        ++kb;
        if (b + P < u1) ring[i] = ld_weights(wq + size_t(b + P) * 32, pol);
      }
    }
  }
  a.ws[slot * 32 + lane] = make_float4(c[0][0] + c[1][0], c[0][1] + c[1][1], c[0][2] + c[1][2], c[0][3] + c[1][3]);
}

// Bulk (TMA) stream: CTA = R consecutive tiles over all of k (one contiguous region of the tile-major matrix), read
// by one producer thread as cp.async.bulk chunks of CH k-blocks into an NS-stage shared-memory ring (mbarrier
// full / empty pairs); all of the CTA's first NS chunks are requested before anything else. 8 consumer warps
// take the chunk's k-blocks round-robin; the CTA's sum in shared memory, no cross-CTA reduction.
template <int NS, int CH, int R>
__global__ void __launch_bounds__(288, 2) bulk_kernel(const __grid_constant__ Args a, int k) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[NS], empty[NS];
  __shared__ float4 red[8][R][32];
  uint4* ring = reinterpret_cast<uint4*>(smem);  // [NS][CH · 32]
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(ring + NS * CH * 32);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tile0 = blockIdx.x * R, nt = min(R, a.n_tiles - tile0);
  const int chunks_per_tile = (a.kblocks + CH - 1) / CH, nchunks = nt * chunks_per_tile;
  if (threadIdx.x == 0) {
    for (int i = 0; i < NS; ++i) mbar_init(&full[i], 1), mbar_init(&empty[i], 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const uint4* src = a.q + size_t(tile0) * a.kblocks * 32;
  auto chunk_kb = [&](int c) { const int j = c % chunks_per_tile; return min(CH, a.kblocks - j * CH); };
  auto chunk_src = [&](int c) { return src + (size_t(c / chunks_per_tile) * a.kblocks + (c % chunks_per_tile) * CH) * 32; };
  if (warp == 8) {  // producer
    if (lane == 0) {
      const uint64_t pol = evict_first_policy();
      for (int c = 0; c < nchunks; ++c) {
        const int s = c % NS;
        if (c >= NS) mbar_wait(&empty[s], ((c / NS) - 1) & 1);
        const unsigned bytes = unsigned(chunk_kb(c)) * 512;
        mbar_expect_tx(&full[s], bytes);
        bulk_copy_to_shared(ring + s * CH * 32, chunk_src(c), bytes, &full[s], pol);
      }
    }
    return;
  }
  // Consumers: x (one row, all of k), then the chunks.
  for (int i = threadIdx.x; i < k / 8; i += 256) cp_async16(smem_u32(xs + i * 8), a.x + i * 8, true);
  cp_async_commit();
  cp_async_wait<0>();
  asm volatile("bar.sync 1, 256;" ::: "memory");
  const uint32_t xa = smem_u32(xs) + ((lane >> 3) & 1) * 16;
  float c2[R][2][4] = {};
  for (int c = 0; c < nchunks; ++c) {
    const int s = c % NS, r = c / chunks_per_tile, kb0 = (c % chunks_per_tile) * CH, n = chunk_kb(c);
    mbar_wait(&full[s], (c / NS) & 1);
    for (int j = warp; j < n; j += 8) {
      const uint4 w = ring[(s * CH + j) * 32 + lane];
      const uint32_t ws4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        uint32_t f[4], b0, b1;
        dequant_fragment(ws4[st], 0xC300C300u, 0xC300C300u, f);
        ldmatrix_x2(xa + (kb0 + j) * 128 + st * 32, b0, b1);
#pragma unroll
        for (int rr = 0; rr < R; ++rr)
          if (rr == r) mma_bf16(c2[rr][st & 1], f, b0, b1);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
    red[warp][rr][lane] = make_float4(c2[rr][0][0] + c2[rr][1][0], c2[rr][0][1] + c2[rr][1][1], c2[rr][0][2] + c2[rr][1][2],
                                      c2[rr][0][3] + c2[rr][1][3]);
  asm volatile("bar.sync 1, 256;" ::: "memory");
  if (warp < nt) {
    float4 t = red[0][warp][lane];
    for (int q = 1; q < 8; ++q) {
      const float4 u = red[q][warp][lane];
      t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
    }
    const int g = lane >> 2, tile = tile0 + warp;
    a.y[size_t(tile) * 16 + g] = __float2bfloat16(t.x);
    a.y[size_t(tile) * 16 + g + 8] = __float2bfloat16(t.z);
  }
}

struct Shape {
  const char* name;
  int n, k;
};

int main(int argc, char** argv) {
  const bool only_bulk = argc > 1;
  int sms = 0, l2 = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  const Shape shapes[] = {{"8b-down", 4096, 14336}, {"8b-gate", 14336, 4096}, {"8b-q/o", 4096, 4096}, {"1b-gate", 8192, 2048}};
  __nv_bfloat16 *x, *y;
  float4* ws;
  unsigned* counters;
  CK(cudaMalloc(&x, 14336 * 2));
  CK(cudaMemset(x, 0, 14336 * 2));
  CK(cudaMalloc(&y, 28672 * 2 * 8));
  CK(cudaMalloc(&ws, size_t(64) << 20));
  CK(cudaMalloc(&counters, 4096 * 4));
  CK(cudaMemset(counters, 0, 4096 * 4));
  auto set_smem = [](auto fn) { CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024)); };
  set_smem(part_kernel<false, 0>);
  set_smem(part_kernel<true, 0>);
  set_smem(part_kernel<true, 1>);
  set_smem(part_kernel<true, 2>);
  set_smem(part_kernel<true, 3>);
  set_smem(stream_kernel);
  std::printf("%d SMs, L2 %d MB\n", sms, l2 >> 20);
  std::printf("%-9s %-22s %9s %9s\n", "shape", "variant", "us", "GB/s");
  for (const Shape& s : shapes) {
    const size_t bytes = size_t(s.n) * s.k / 2;
    const RotatingCopies weights(bytes, l2);
    const int n_tiles = s.n / 16, kblocks = s.k / 64;
    auto timeit = [&](auto&& launch) { return weights.time(st, launch); };
    auto report = [&](const char* v, double us) { std::printf("%-9s %-22s %9.2f %9.0f\n", s.name, v, us, bytes / us / 1e3); };
    using Fn = void (*)(Args);
    const struct {
      const char* name;
      Fn fn;
      bool cluster;
    } vars[] = {{"base", part_kernel<false, 0>, false}, {"+x", part_kernel<true, 0>, false},
                {"+x+cta", part_kernel<true, 1>, false}, {"+x+ws", part_kernel<true, 2>, false},
                {"+x+clu", part_kernel<true, 3>, true}};
    for (int R : {1, 2})
      for (int S : {1, 2, 4, 8}) {
        if (only_bulk && !(R == 1 && (S == 1 || S == 4))) continue;
        const int KS = 8 / R, kbw = (kblocks + KS * S - 1) / (KS * S);
        if (S > 1 && (S - 1) * KS * kbw >= kblocks) continue;
        for (const auto& var : vars) {
          const dim3 grid((n_tiles + R - 1) / R, S);
          const size_t smem = 8 * 32 * 16 + size_t(KS) * kbw * 128;
          char v[64];
          std::snprintf(v, sizeof v, "%s R%d S%d (%d)", var.name, R, S, grid.x * grid.y);
          report(v, timeit([&](const uint4* p) {
                   Args a{p, x, ws, counters, y, n_tiles, kblocks, R, kbw, S};
                   cudaLaunchConfig_t cfg = {};
                   cfg.gridDim = grid;
                   cfg.blockDim = dim3(256);
                   cfg.dynamicSmemBytes = smem;
                   cfg.stream = st;
                   cudaLaunchAttribute attr[1];
                   attr[0].id = cudaLaunchAttributeClusterDimension;
                   attr[0].val.clusterDim.x = 1;
                   attr[0].val.clusterDim.y = S;
                   attr[0].val.clusterDim.z = 1;
                   cfg.attrs = attr;
                   cfg.numAttrs = var.cluster ? 1 : 0;
                   CK(cudaLaunchKernelEx(&cfg, var.fn, a));
                 }));
        }
      }
    for (int per_sm : {1, 2, 3}) {
      const int blocks = sms * per_sm;
      char v[64];
      std::snprintf(v, sizeof v, "stream %d/SM (%d)", per_sm, blocks);
      report(v, timeit([&](const uint4* p) {
               Args a{p, x, ws, counters, y, n_tiles, kblocks, 1, 0, 1};
               stream_kernel<<<blocks, 256, size_t(s.k) * 2, st>>>(a, s.k);
             }));
    }

    auto bulk = [&](const char* name, auto fn, int NS, int CH, int R) {
      const size_t smem = size_t(NS) * CH * 512 + size_t(s.k) * 2;
      CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      char v[64];
      std::snprintf(v, sizeof v, "%s NS%d CH%d R%d", name, NS, CH, R);
      const int blocks = (n_tiles + R - 1) / R;
      report(v, timeit([&](const uint4* p) {
               Args a{p, x, ws, counters, y, n_tiles, kblocks, R, 0, 1};
               fn<<<blocks, 288, smem, st>>>(a, s.k);
             }));
    };
    bulk("bulk", bulk_kernel<4, 16, 1>, 4, 16, 1);
    bulk("bulk", bulk_kernel<8, 16, 1>, 8, 16, 1);
    bulk("bulk", bulk_kernel<4, 32, 1>, 4, 32, 1);
    bulk("bulk", bulk_kernel<8, 8, 1>, 8, 8, 1);
    bulk("bulk", bulk_kernel<4, 16, 2>, 4, 16, 2);
    bulk("bulk", bulk_kernel<6, 16, 2>, 6, 16, 2);
    bulk("bulk", bulk_kernel<8, 16, 4>, 8, 16, 4);
  }
  return 0;
}
