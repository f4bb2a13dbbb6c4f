// Device side of the error compensator fused into the W4A16 decode launch (w4a16_gemm.h states the contract;
// w4a16_decode.cu calls these). Internal to the CUDA backend.
//
// The launch gets extra leading CTA columns, the EC CTAs: each computes one k-slice of z = A·x, its slice of A
// (rank × 256·cpr columns) loaded into registers before griddepcontrol.wait, so those loads are among the
// first in the memory queue, and releases its partial sums with an atomic arrival count. The W4 CTAs of a
// compensated matrix acquire the count after their own reduction, sum the slices in order, apply the gate
// themselves (a few hundred FMAs, parameters prefetched) and add B·(g ⊙ z) from their prefetched rows of B.
// Every CTA of the launch is resident at once (the planner only takes one-wave plans with ECs), so the
// flag wait cannot deadlock whatever order the CTAs start in.
//
// Scratch of one EC (w4a16_ec_scratch_bytes): counters (done: the launch's CTAs, used in the first EC's
// scratch; arrivals of k-slices), then the k-slice partial sums [kEcMaxSlices][32][rank] fp32.
// The last CTA of the launch puts the counters back to zero, so the scratch serves every launch of its linear.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "backend/cuda/w4a16_common.cuh"

namespace spear::cuda::w4_detail {

constexpr int kEcRing = 8;         // uint4 of A per lane: rank / 8 rows × cpr chunks of 256 columns
constexpr int kEcMaxSlices = 72;   // 64 slices + up to 7 empty ones that round up to whole cluster columns
constexpr int kEcCounterBytes = 16;

__host__ __device__ constexpr size_t ec_scratch_bytes(int rank) {
  return size_t(kEcCounterBytes) + size_t(4) * 32 * rank * kEcMaxSlices;
}

// One fused EC as the kernel sees it (inside W4DecodeParams, by value).
struct W4DecEc {
  const __nv_bfloat16* A;  // [rank][k]
  const __nv_bfloat16* B;  // [n][rank]
  const float *W1, *b1, *W2, *b2;
  unsigned* counters;  // done, arrivals
  float* zpart;        // [kEcMaxSlices][32][rank]
  int rank, gate_width;
  int cpr;             // 256-column chunks per slice (kc = 256 · cpr)
  int slices;          // cols · gridDim.y
  int col0, cols;      // EC CTA columns [col0, col0 + cols) of blockIdx.x
};

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(pa[i]), fb = __bfloat1622float2(pb[i]);
    s = fmaf(fa.x, fb.x, s);
    s = fmaf(fa.y, fb.y, s);
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Register chunk i of the EC CTA's slice: row warp + 8 · (i / cpr), columns k0 + 256 · (i % cpr) + 8 · lane.
__device__ __forceinline__ void ec_chunk(const W4DecEc& e, int slice, int k, int i, int& row, int& col, bool& ok) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ri = i / e.cpr, ci = i - ri * e.cpr;
  const int k0 = slice * e.cpr * 256;
  row = warp + 8 * ri;
  col = k0 + ci * 256 + lane * 8;
  ok = ri < (e.rank >> 3) && col < min(k, k0 + e.cpr * 256);
}

// Before griddepcontrol.wait: the slice's A into registers.
__device__ __forceinline__ void ec_prefetch(const W4DecEc& e, int slice, int k, uint4 (&a)[kEcRing]) {
#pragma unroll
  for (int i = 0; i < kEcRing; ++i) {
    int row, col;
    bool ok;
    ec_chunk(e, slice, k, i, row, col, ok);
    a[i] = ok ? __ldg(reinterpret_cast<const uint4*>(e.A + size_t(row) * k + col)) : make_uint4(0, 0, 0, 0);
  }
}

// Shared memory of an EC CTA: x [m][256 · cpr] bf16, then z partials [rank][m] fp32.
__host__ __device__ constexpr size_t ec_cta_smem_bytes(int m, int cpr, int rank) {
  return size_t(m) * 256 * cpr * 2 + size_t(rank) * m * 4;
}

// After griddepcontrol.wait: the slice's columns of x for tokens [0, m) are staged (cp.async: the previous
// kernel wrote x), then the slice's partial z goes into zpart and the arrival count is raised (release).
// smem: ec_cta_smem_bytes. Every thread calls it.
__device__ __forceinline__ void ec_slice(const W4DecEc& e, int slice, const uint4 (&a)[kEcRing],
                                         const __nv_bfloat16* x, int m, int k, unsigned char* smem) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int kc = e.cpr * 256, k0 = slice * kc;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  float* zs = reinterpret_cast<float*>(xs + m * kc);
  for (int i = tid; i < m * (kc / 8); i += kThreads) {
    const int t = i / (kc / 8), c = (i - t * (kc / 8)) * 8;
    const bool ok = k0 + c < k;
    cp_async16(smem_u32(xs + t * kc + c), ok ? x + size_t(t) * k + k0 + c : x, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  for (int t = 0; t < m; ++t) {
    float acc[kEcRing];
#pragma unroll
    for (int i = 0; i < kEcRing; ++i) {
      int row, col;
      bool ok;
      ec_chunk(e, slice, k, i, row, col, ok);
      acc[i] = ok ? dot8_bf16(a[i], *reinterpret_cast<const uint4*>(xs + t * kc + (col - k0))) : 0.f;
    }
    // Lane 0 of each warp owns its rows: chunks of a row are added in chunk order (deterministic).
#pragma unroll
    for (int i = 0; i < kEcRing; ++i) {
      int row, col;
      bool ok;
      ec_chunk(e, slice, k, i, row, col, ok);
      const float v = warp_sum(acc[i]);
      if (lane == 0 && row < e.rank && (i % e.cpr) == 0) zs[row * m + t] = 0.f;
      if (lane == 0 && row < e.rank) zs[row * m + t] += v;
    }
  }
  __syncthreads();
  for (int i = tid; i < m * e.rank; i += kThreads) {
    const int t = i / e.rank, j = i - t * e.rank;
    __stcg(e.zpart + (size_t(slice) * 32 + t) * e.rank + j, zs[j * m + t]);
  }
  __syncthreads();
  if (tid == 0) {  // release: the CTA's zpart stores (ordered before by the barrier) are visible to acquirers
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(e.counters + 1) : "memory");
  }
}

// Gate parameters in shared memory: W1 [gw][r], W2 [r][gw], b1 [gw], b2 [r] fp32 (a multiple of 4 floats).
__host__ __device__ constexpr int ec_gate_floats(int rank, int gw) { return (2 * gw * rank + gw + rank + 3) / 4 * 4; }

// Before griddepcontrol.wait (constants): the gate's parameters into gs (4-byte cp.async: any gate width).
__device__ __forceinline__ void ec_prefetch_gate(const W4DecEc& e, float* gs) {
  const int r = e.rank, gw = e.gate_width;
  if (gw == 0) return;
  const int n1 = gw * r, n2 = 2 * gw * r, n3 = n2 + gw, n = n3 + r;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float* src = i < n1 ? e.W1 + i : i < n2 ? e.W2 + (i - n1) : i < n3 ? e.b1 + (i - n2) : e.b2 + (i - n3);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(gs + i)), "l"(src) : "memory");
  }
}

// A W4 CTA of a compensated matrix, after its reduction: waits until every k-slice has arrived, sums the
// slices in slice order (z: the same bits in every CTA), then g ⊙ z for tokens [0, m) into zg [m][rank] (shared
// memory; zt [m][rank] and hb [m][gate_width] are shared scratch, gs the prefetched gate). Every thread calls
// it; ends with __syncthreads.
__device__ __forceinline__ void ec_gate(const W4DecEc& e, int m, float* zg, float* zt, float* hb, const float* gs) {
  if (threadIdx.x == 0)
    while (ld_acquire_gpu(e.counters + 1) < unsigned(e.slices)) __nanosleep(20);
  __syncthreads();
  const int r = e.rank, gw = e.gate_width;
  float* zdst = gw > 0 ? zt : zg;
  for (int i = threadIdx.x; i < m * r; i += kThreads) {
    const int t = i / r, j = i - t * r;
    float z = 0.f;
    for (int q = 0; q < e.slices; ++q) z += __ldcg(e.zpart + (size_t(q) * 32 + t) * r + j);
    zdst[i] = z;
  }
  __syncthreads();
  if (gw == 0) return;
  const float *W1 = gs, *W2 = gs + gw * r, *b1 = W2 + gw * r, *b2 = b1 + gw;
  for (int i = threadIdx.x; i < m * gw; i += kThreads) {
    const int t = i / gw, q = i - t * gw;
    float s = b1[q];
    for (int j = 0; j < r; ++j) s = fmaf(W1[q * r + j], zt[t * r + j], s);
    hb[i] = s / (1.f + expf(-s));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < m * r; i += kThreads) {
    const int t = i / r, j = i - t * r;
    float u = b2[j];
    for (int q = 0; q < gw; ++q) u = fmaf(W2[j * gw + q], hb[t * gw + q], u);
    zg[i] = (1.f + tanhf(u)) * zt[i];
  }
  __syncthreads();
}

// Σ_j B[row][j] · (g ⊙ z)[tok][j] from shared memory (bs: this row's B, zs: this token's g ⊙ z).
__device__ __forceinline__ float ec_term(const __nv_bfloat16* bs, const float* zs, int r) {
  float s = 0.f;
  for (int j = 0; j < r; j += 2) {
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bs + j));
    s = fmaf(b.x, zs[j], s);
    s = fmaf(b.y, zs[j + 1], s);
  }
  return s;
}

}  // namespace spear::cuda::w4_detail
