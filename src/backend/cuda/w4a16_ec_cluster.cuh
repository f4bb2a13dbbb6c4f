// The error compensator fused into the bulk decode launch inside thread-block clusters (w4a16_decode_bulk.cu; the
// plan's ec_w4_gate 2-4). Internal to the CUDA backend.
//
// The W4 CTAs of a compensated matrix form clusters of C consecutive row tiles; CTA c of a cluster owns k-slice c of
// z = A·x. Its consumer warps stage its slice of A in shared memory before griddepcontrol.wait, like the weights; once
// x is staged for their main loop they compute the slice's partial z on the tensor cores (A's rows as the MMA rows,
// the tokens as its columns, x through the main loop's ldmatrix addresses), sum the warps in order and store the
// partial into slot [c] of every peer's shared memory (DSMEM), then run their main loop. The producer warp, idle once
// it has requested the codes, waits for every peer's partial (the cluster barrier), sums the C slots in rank order
// (the same sum in every CTA of the cluster) and applies the gate while the main loop runs; the consumers meet it (a
// named barrier) only after their loop, to add B·(g ⊙ z) in the epilogue.
//
// Why: with EC CTAs (w4a16_ec.cuh) the chain from x to g ⊙ z is about six dependent L2 round trips (the epoch, x,
// the partial stores and their fence, the ticket, the slice sum, the W4 CTAs' poll), 3–5 µs per compensated launch on
// the H200, longer than the whole main loop of a 1B-shaped launch. Here the chain has no global round trip, and only
// its first link (the partial) precedes the main loop. The price: every cluster reads all of A (4 / C of the launch's W4 bytes at rank 16, mostly L2
// hits), and a slice of A in every CTA's shared memory. No CTA waits on another cluster: any number of waves.
//
// The cluster barrier (every thread of the cluster arrives on each phase): phase 1, arrived at the start and waited
// on before the first DSMEM store, makes sure every peer has started; phase 2 is the partials (the consumers arrive
// with release semantics after their stores; the producer warp arrives, then waits). No CTA touches another's shared
// memory after phase 2, and a CTA leaves only after its producer warp has waited on it, so none leaves while a peer
// still writes into it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/cuda/w4a16_ec.cuh"

namespace spear::cuda::w4_detail {

// Cluster sizes of the in-cluster EC, by DecodePlan::ec_w4_gate (2: 8 CTAs, 3: 16, which needs the non-portable
// cluster-size attribute, 4: 4 CTAs). 0 for the other values.
constexpr int kEcClusterGates[3] = {2, 3, 4};
__host__ __device__ constexpr int ec_cluster_size(int ec_w4_gate) {
  return ec_w4_gate == 2 ? 8 : ec_w4_gate == 3 ? 16 : ec_w4_gate == 4 ? 4 : 0;
}

// Rows of A staged per CTA (the MMA's 16-row tiles; rows >= rank are zeros), k-blocks of the slice, row stride of the
// staged A in elements (16 bytes of padding: ldmatrix rows fall in distinct banks).
__host__ __device__ constexpr int ec_cl_rows(int rank) { return (rank + 15) / 16 * 16; }
__host__ __device__ constexpr int ec_cl_kblocks(int kblocks, int C) { return (kblocks + C - 1) / C; }
__host__ __device__ constexpr int ec_cl_astride(int kblocks, int C) { return ec_cl_kblocks(kblocks, C) * kKBlock + 8; }

// Shared memory of the in-cluster EC beside the bulk kernel's own: A's slice [rows][astride] bf16, which the warps'
// partial tiles [kWarps][rows / 16][32] float4 overwrite once every warp is done with it, then the C slots [C][m][rank]
// fp32.
__host__ __device__ constexpr size_t ec_cl_region_bytes(int rmax, int kblocks, int C) {
  return size_t(ec_cl_rows(rmax)) * ec_cl_astride(kblocks, C) * 2 > size_t(kWarps) * (ec_cl_rows(rmax) / 16) * 512
             ? size_t(ec_cl_rows(rmax)) * ec_cl_astride(kblocks, C) * 2
             : size_t(kWarps) * (ec_cl_rows(rmax) / 16) * 512;
}
__host__ __device__ constexpr size_t ec_cluster_smem_bytes(int m, int rmax, int kblocks, int C) {
  return ec_cl_region_bytes(rmax, kblocks, C) + size_t(C) * m * rmax * 4;
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// v into the same shared-memory location of the cluster's CTA `rank`.
__device__ __forceinline__ void st_peer_f32(const float* local, uint32_t rank, float v) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(local)), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}

// Before griddepcontrol.wait (A is a load-time constant): the slice's columns [k0, k0 + kc) of A's rows into as
// [ec_cl_rows(rank)][astride] bf16, zeros past the rank and past k (cp.async, committed by the caller). k % 8 == 0.
__device__ __forceinline__ void ec_cluster_prefetch_a(const W4DecEc& e, int k, int k0, int kc, int astride,
                                                      __nv_bfloat16* as) {
  const int segs = kc / 8, rows = ec_cl_rows(e.rank);
  for (int i = threadIdx.x; i < rows * segs; i += kThreads) {
    const int row = i / segs, c = (i - row * segs) * 8;
    const bool ok = row < e.rank && k0 + c < k;
    cp_async16(smem_u32(as + row * astride + c), ok ? e.A + size_t(row) * k + k0 + c : e.A, ok);
  }
}

// Named barriers between the consumer warps and the producer warp (0 is __syncthreads, 1 the consumers').
constexpr int kBarGzReady = 2;  // the producer has g ⊙ z in shared memory (it arrives; the consumers wait)
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The consumer warps, once x and the staged A have landed (xrow: the lane's ldmatrix address of x's token row, as in
// the main loop): the slice's nks k-steps (global k-steps ks0...) of z = A·x, each warp every eighth k-step, the warps'
// tiles summed in warp order in red (over the staged A: ec_cl_region_bytes), then (after the first phase) stored into
// slot [crank] of each of the C CTAs of the cluster. The caller arrives on the second phase with release semantics.
// Every thread of warps 0-7 calls it; barrier() syncs them.
template <class Barrier>
__device__ __forceinline__ void ec_cluster_partial(const W4DecEc& e, int m, int ks0, int nks, const __nv_bfloat16* as,
                                                   int astride, uint32_t xrow, float4* red, float* slots, int C,
                                                   uint32_t crank, Barrier barrier) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, mts = ec_cl_rows(e.rank) / 16;
  float acc[4][4] = {};
  const uint32_t arow = smem_u32(as) + uint32_t(((lane & 15) * astride + (lane >> 4) * 8) * 2);
  for (int s = warp; s < nks; s += kWarps) {
    uint32_t b0, b1;
    ldmatrix_x2(xrow + uint32_t(ks0 + s) * 32, b0, b1);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
      if (mt < mts) {
        uint32_t a[4];
        ldmatrix_x4(arow + uint32_t((mt * 16 * astride + s * 16) * 2), a[0], a[1], a[2], a[3]);
        mma_bf16(acc[mt], a, b0, b1);
      }
  }
  barrier();  // every warp is done with the staged A
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
    if (mt < mts) red[(warp * mts + mt) * 32 + lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
  barrier();
  cluster_wait_acquire();  // the first phase: every peer has started (its shared memory exists)
  const int r = e.rank;
  for (int o = threadIdx.x; o < m * r; o += kThreads) {
    const int t = o / r, j = o - t * r;
    // Accumulator (row j, token t): lane (j mod 8) · 4 + t / 2 of the row tile, element 2 · (j mod 16 >= 8) + t mod 2.
    const int mt = j >> 4, ln = (j & 7) * 4 + (t >> 1), el = ((j >> 3) & 1) * 2 + (t & 1);
    float z = 0.f;
    for (int w = 0; w < kWarps; ++w) z += reinterpret_cast<const float*>(&red[(w * mts + mt) * 32 + ln])[el];
    float* dst = slots + (size_t(crank) * m + t) * r + j;
    for (int c = 0; c < C; ++c) st_peer_f32(dst, uint32_t((int(crank) + c) % C), z);
  }
}

// The producer warp after the second phase: z [m][rank] = the C slots summed in rank order (into zt when the EC is
// gated, else into zg), then g ⊙ z into zg (ec_apply_gate by the warp's 32 lanes).
__device__ __forceinline__ void ec_cluster_gz_warp(const W4DecEc& e, int m, const float* slots, int C, float* zg,
                                                   float* zt, float* hb, const float* gs) {
  const int lane = threadIdx.x & 31, n = m * e.rank;
  float* zdst = e.gate_width > 0 ? zt : zg;
  for (int o = lane; o < n; o += 32) {
    float z = 0.f;
    for (int c = 0; c < C; ++c) z += slots[c * n + o];
    zdst[o] = z;
  }
  __syncwarp();
  ec_apply_gate(e, m, zg, zt, hb, gs, [] { __syncwarp(); }, lane, 32);
}

}  // namespace spear::cuda::w4_detail
