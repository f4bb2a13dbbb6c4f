// Device side of the error compensator fused into the W4A16 decode launch (w4a16_gemm.h states the contract;
// w4a16_decode.cu calls these). Internal to the CUDA backend.
//
// The launch gets extra leading CTA columns, the EC CTAs: each computes one k-slice of z = A·x, its slice of A
// (rank × 256·cpr columns) loaded into registers before griddepcontrol.wait, so those loads are among the
// first in the memory queue, and stores its partial sums into the scratch, each tagged with the launch's
// epoch. Each EC CTA then takes a ticket; the last one sums the slices in order, applies the gate (its parameters
// prefetched before the wait) and stores g ⊙ z [m][rank], each entry tagged with the epoch too. The W4 CTAs of a
// compensated matrix issue their loads of those m · rank entries right after their main loop, check the tags
// after their own reduction (the value is its own flag: no release fence on the EC side, no flag load on the W4
// side; a W4 CTA polls again only where the gate is not there yet) and add B·(g ⊙ z) from their prefetched rows
// of B. The slice sum and the gate thus run once, on the EC side, while the W4 CTAs stream their weights (when
// every W4 CTA summed the slices and applied the gate itself, that chain of round trips and barriers was the tail
// of every compensated launch). Every CTA of the launch is resident at once (the planner only takes one-wave plans
// with ECs), so the wait cannot deadlock whatever order the CTAs start in.
//
// Epochs without a reset: every W4 CTA of the matrix adds its share of kEcEpochUnit to a 64-bit counter as
// it leaves (fire and forget), the shares of one launch summing to exactly kEcEpochUnit. A CTA reads the
// counter after griddepcontrol.wait, when every earlier launch has completed and this launch's readers have
// added at most all shares but their own (an EC CTA reads it before any reader can have seen g ⊙ z, which needs
// every EC CTA's ticket), so counter / kEcEpochUnit is the launch's number in every CTA, whatever the plan and the
// number of readers. The ticket goes back to zero by the last EC CTA's own store.
//
// Scratch of one EC (w4a16_ec_scratch_bytes, prepared by w4a16_ec_scratch_init): the counter (8 bytes) and the
// ticket (4 bytes) in kEcCounterBytes, the k-slice partial sums [kEcMaxSlices][32][rank], then g ⊙ z [32][rank],
// every entry 64 bits: fp32 value | epoch << 32 (one single-copy-atomic store).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "backend/cuda/w4a16_common.cuh"

namespace spear::cuda::w4_detail {

constexpr int kEcRing = 8;         // uint4 of A per lane: rank / 8 rows × cpr chunks of 256 columns
constexpr int kEcMaxSlices = 72;   // 64 slices + up to 7 empty ones that round up to whole cluster columns
constexpr int kEcCounterBytes = 16;
constexpr unsigned long long kEcEpochUnit = 1ull << 20;  // > any number of reader CTAs
constexpr uint32_t kEcNoEpoch = 0xFFFFFFFFu;             // the tag of never-written entries

__host__ __device__ constexpr size_t ec_zpart_bytes(int rank) { return size_t(8) * 32 * rank * kEcMaxSlices; }
__host__ __device__ constexpr size_t ec_scratch_bytes(int rank) {
  return size_t(kEcCounterBytes) + ec_zpart_bytes(rank) + size_t(8) * 32 * rank;
}

// One fused EC as the kernel sees it (inside W4DecodeParams, by value).
struct W4DecEc {
  const __nv_bfloat16* A;  // [rank][k]
  const __nv_bfloat16* B;  // [n][rank]
  const float *W1, *b1, *W2, *b2;
  unsigned long long* epochs;  // the readers' shares (see above)
  unsigned long long* zpart;   // [kEcMaxSlices][32][rank]: value | epoch << 32
  unsigned* ticket;            // EC CTAs done with their slice (back to 0 after each launch)
  unsigned long long* gz;      // g ⊙ z [32][rank]: value | epoch << 32
  float* zout;                 // projection-only launches: z = A·x [m][rank] fp32 out (else null)
  int rank, gate_width;
  int cpr;             // 256-column chunks per slice (kc = 256 · cpr)
  int slices;          // cols · gridDim.y
  int col0, cols;      // EC CTA columns [col0, col0 + cols) of blockIdx.x
};

__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// After griddepcontrol.wait: this launch's epoch (see above).
__device__ __forceinline__ uint32_t ec_epoch(const W4DecEc& e) { return uint32_t(ld_relaxed_gpu(e.epochs) >> 20); }

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
  ok = warp < kWarps && ri < (e.rank >> 3) && col < min(k, k0 + e.cpr * 256);  // warp 8: the bulk producer
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

// Shared memory of an EC CTA: x [m][256 · cpr] bf16.
__host__ __device__ constexpr size_t ec_cta_smem_bytes(int m, int cpr) { return size_t(m) * 256 * cpr * 2; }

// After griddepcontrol.wait: the slice's columns of x for tokens [0, m) are staged (cp.async: the previous
// kernel wrote x), then the slice's partial z goes into zpart, tagged with the launch's epoch.
// Tokens are taken kEcTok at a time so that their warp sums are independent chains (one token after another
// made the EC CTA's latency grow with m, and it is on the path of every compensated output).
// smem: ec_cta_smem_bytes. Every thread calls it (x is staged with a stride of kThreads: a ninth warp repeats
// copies of the first).
constexpr int kEcTok = 4;
__device__ __forceinline__ void ec_slice(const W4DecEc& e, int slice, const uint4 (&a)[kEcRing],
                                         const __nv_bfloat16* x, int m, int k, unsigned char* smem) {
  const int tid = threadIdx.x, lane = tid & 31;
  const unsigned long long tag = (unsigned long long)ec_epoch(e) << 32;
  const int kc = e.cpr * 256, k0 = slice * kc;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  for (int i = tid; i < m * (kc / 8); i += kThreads) {
    const int t = i / (kc / 8), c = (i - t * (kc / 8)) * 8;
    const bool ok = k0 + c < k;
    cp_async16(smem_u32(xs + t * kc + c), ok ? x + size_t(t) * k + k0 + c : x, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if ((tid >> 5) >= kWarps) return;  // the bulk kernel's producer warp: staging only (rows are per warp 0-7)
  const int rows8 = e.rank >> 3;  // register chunks i with i / cpr < rows8 hold rows of A (warp-uniform)
  for (int t0 = 0; t0 < m; t0 += kEcTok) {
    float z[kEcTok];
#pragma unroll
    for (int i = 0; i < kEcRing; ++i) {
      const int ri = i / e.cpr, ci = i - ri * e.cpr;
      if (ri >= rows8) break;
      int row, col;
      bool ok;
      ec_chunk(e, slice, k, i, row, col, ok);
      float s[kEcTok];
#pragma unroll
      for (int u = 0; u < kEcTok; ++u)
        s[u] = ok && t0 + u < m ? dot8_bf16(a[i], *reinterpret_cast<const uint4*>(xs + (t0 + u) * kc + (col - k0)))
                                : 0.f;
#pragma unroll
      for (int u = 0; u < kEcTok; ++u) {
        s[u] = warp_sum(s[u]);
        z[u] = ci == 0 ? s[u] : z[u] + s[u];  // a row's chunks in chunk order (deterministic)
      }
      if (ci == e.cpr - 1 && lane == 0)  // lane 0 of each warp owns its rows
#pragma unroll
        for (int u = 0; u < kEcTok; ++u)
          if (t0 + u < m)
            __stcg(e.zpart + (size_t(slice) * 32 + t0 + u) * e.rank + row, tag | __float_as_uint(z[u]));
    }
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

// Before griddepcontrol.wait (constants, like the weights): rows [row0, row0 + rows) of B into bs [rows][rank]
// (rows >= n zero-filled); cp.async, committed by the caller.
__device__ __forceinline__ void ec_prefetch_b(const W4DecEc& e, int row0, int rows, int n, __nv_bfloat16* bs) {
  const int r = e.rank, segs = r / 8;
  for (int i = threadIdx.x; i < rows * segs; i += kThreads) {
    const int row = i / segs, sg = i - row * segs;
    const bool ok = row0 + row < n;
    cp_async16(smem_u32(bs + row * r + sg * 8), ok ? e.B + size_t(row0 + row) * r + sg * 8 : e.B, ok);
  }
}

// Dot product of n floats (n % 4 == 0, both 16-byte aligned, shared memory) in four chains.
__device__ __forceinline__ float dot_smem4(const float* a, const float* b, int n) {
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < n; j += 4) {
    const float4 x = *reinterpret_cast<const float4*>(a + j), y = *reinterpret_cast<const float4*>(b + j);
    s[0] = fmaf(x.x, y.x, s[0]);
    s[1] = fmaf(x.y, y.y, s[1]);
    s[2] = fmaf(x.z, y.z, s[2]);
    s[3] = fmaf(x.w, y.w, s[3]);
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Lanes per output of the slice sum: a power of two up to 32, as many as the CTA's threads allow.
__device__ __forceinline__ int ec_poll_lanes(int outs) {
  int P = 1;
  while (P < 32 && outs * P * 2 <= kThreads) P *= 2;
  return P;
}

constexpr int kEcPoll = 4;  // entries per lane and poll

// The last EC CTA of a launch (ec_finish): waits for its entries of every k-slice to carry this launch's epoch
// (read after griddepcontrol.wait; after the ticket they all do) and sums them in slice order, then g ⊙ z for
// tokens [0, m) into zg [m][rank] (shared memory; zt [m][rank] and hb [m][gate width, rounded up to 4] are shared
// scratch, gs the prefetched gate). The slices of one output are read by P lanes of a warp, kEcPoll entries per
// poll (strided, then a shuffle tree). The gate's dot products run in four chains from 16-byte shared-memory loads.
// Every thread of warps 0-7 calls it; barrier() syncs them (__syncthreads, or the bulk kernel's named barrier of its
// consumer warps); ends with one.
template <class Barrier>
__device__ __forceinline__ void ec_apply_gate(const W4DecEc& e, int m, float* zg, const float* zt, float* hb,
                                              const float* gs, Barrier barrier, int tid = threadIdx.x,
                                              int nthr = kThreads);

template <class Barrier>
__device__ __forceinline__ void ec_gate(const W4DecEc& e, uint32_t epoch, int m, float* zg, float* zt, float* hb,
                                        const float* gs, Barrier barrier) {
  const int r = e.rank, gw = e.gate_width, outs = m * r;
  float* zdst = gw > 0 ? zt : zg;
  const int P = ec_poll_lanes(outs);
  const int lane = threadIdx.x & 31, sub = lane & (P - 1);
  const unsigned mask = P == 32 ? 0xffffffffu : ((1u << P) - 1) << (lane & ~(P - 1));
  for (int o = threadIdx.x / P; o < outs; o += kThreads / P) {  // the P lanes of an output iterate together
    const int t = o / r, j = o - t * r;
    const unsigned long long* src = e.zpart + size_t(t) * r + j;
    float z = 0.f;
    for (int q0 = sub; q0 < e.slices; q0 += P * kEcPoll) {
      unsigned long long v[kEcPoll];
      for (;;) {
        bool ready = true;
#pragma unroll
        for (int u = 0; u < kEcPoll; ++u) {
          const int q = q0 + u * P;
          v[u] = q < e.slices ? ld_relaxed_gpu(src + size_t(q) * 32 * r) : 0ull;
          ready = ready && (q >= e.slices || uint32_t(v[u] >> 32) == epoch);
        }
        if (ready) break;
        __nanosleep(32);
      }
#pragma unroll
      for (int u = 0; u < kEcPoll; ++u)
        if (q0 + u * P < e.slices) z += __uint_as_float(uint32_t(v[u]));
    }
    for (int d = P >> 1; d > 0; d >>= 1) z += __shfl_xor_sync(mask, z, d);
    if (sub == 0) zdst[o] = z;
  }
  barrier();
  ec_apply_gate(e, m, zg, zt, hb, gs, barrier);
}

// The gate on z [m][rank] (in zt when the EC is gated, else already in zg, which it then leaves as it is): g ⊙ z into
// zg. hb: [m][gate width, rounded up to 4] of scratch, gs the gate's parameters (all shared memory). Threads tid of
// nthr (warps 0-7 by default; one warp with nthr 32 and __syncwarp) call it after a barrier that published z; ends
// with barrier() where it writes anything.
template <class Barrier>
__device__ __forceinline__ void ec_apply_gate(const W4DecEc& e, int m, float* zg, const float* zt, float* hb,
                                              const float* gs, Barrier barrier, int tid, int nthr) {
  const int r = e.rank, gw = e.gate_width;
  if (gw == 0) return;
  const int gw4 = (gw + 3) & ~3;  // hb rows padded with zeros, so W2's rows are read four at a time
  const float *W1 = gs, *W2 = gs + gw * r, *b1 = W2 + gw * r, *b2 = b1 + gw;
  auto hidden = [&](int i) {  // silu(W1·z + b1) of (token, gate unit) i of [m][gw4]
    const int t = i / gw4, q = i - t * gw4;
    if (q >= gw) return 0.f;
    const float s = b1[q] + dot_smem4(W1 + q * r, zt + t * r, r);
    return s / (1.f + expf(-s));
  };
  auto gated = [&](int i) {  // (1 + tanh(W2·h + b2)) ⊙ z of (token, rank) i of [m][r]
    const int t = i / r, j = i - t * r;
    float u = b2[j];
    if (gw % 4 == 0) {  // W2's rows are 16-byte aligned then
      u += dot_smem4(W2 + j * gw, hb + t * gw4, gw);
    } else {
      for (int q = 0; q < gw; ++q) u = fmaf(W2[j * gw + q], hb[t * gw4 + q], u);
    }
    return (1.f + tanhf(u)) * zt[i];
  };
  if (nthr > 32 && m * gw4 <= 32 && m * r <= 32) {  // one warp, no CTA barrier between the layers (small ranks)
    if (tid < 32) {
      if (tid < m * gw4) hb[tid] = hidden(tid);
      __syncwarp();
      if (tid < m * r) zg[tid] = gated(tid);
    }
    barrier();
    return;
  }
  for (int i = tid; i < m * gw4; i += nthr) hb[i] = hidden(i);
  barrier();
  for (int i = tid; i < m * r; i += nthr) zg[i] = gated(i);
  barrier();
}

// Shared memory of an EC CTA after its x staging (ec_cta_smem_bytes): the gate's parameters, then the last EC CTA's
// z, g ⊙ z and the gate's hidden layer (fp32).
__host__ __device__ constexpr size_t ec_finish_smem_bytes(int m, int rank, int gw) {
  return (size_t(ec_gate_floats(rank, gw)) + size_t(2) * m * rank + size_t(m) * ((gw + 3) & ~3)) * 4;
}

// At the end of a W4 CTA of a compensated matrix: its share of the launch's kEcEpochUnit (the CTA with index 0
// of the matrix's `readers` adds the remainder). Fire and forget; thread 0 calls it.
__device__ __forceinline__ void ec_leave(const W4DecEc& e, int index, int readers) {
  const unsigned long long share = kEcEpochUnit / unsigned(readers);
  const unsigned long long add = index == 0 ? kEcEpochUnit - share * unsigned(readers - 1) : share;
  asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(e.epochs), "l"(add) : "memory");
}

// Every thread of an EC CTA after ec_slice: the CTA's ticket (its entries fenced first); true in the last EC CTA of
// the launch to finish, which then sees every CTA's entries. barrier() syncs warps 0-7.
template <class Barrier>
__device__ __forceinline__ bool ec_last_cta(const W4DecEc& e, Barrier barrier) {
  __shared__ int ec_last;
  __threadfence();  // this thread's entries, before the CTA's ticket
  barrier();
  if (threadIdx.x == 0) ec_last = atomicAdd(e.ticket, 1u) == unsigned(e.slices - 1);
  barrier();
  if (!ec_last) return false;
  __threadfence();
  return true;
}

// An EC CTA after ec_slice: the last one to finish (ticket) sums the slices, applies the gate and stores g ⊙ z for
// tokens [0, m), tagged with the epoch (see the file header). gs: the gate's parameters, prefetched by the caller
// before griddepcontrol.wait (cp.async, committed), then ec_finish_smem_bytes of scratch. Every thread of warps 0-7
// calls it; barrier() syncs them.
template <class Barrier>
__device__ __noinline__ void ec_finish(const W4DecEc& e, int m, float* gs, Barrier barrier) {
  if (!ec_last_cta(e, barrier)) return;
  const int r = e.rank, gw = e.gate_width;
  float* zt = gs + ec_gate_floats(r, gw);
  float* zg = zt + m * r;
  float* hb = zg + m * r;
  cp_async_wait<0>();
  barrier();
  const uint32_t epoch = ec_epoch(e);
  ec_gate(e, epoch, m, zg, zt, hb, gs, barrier);
  const unsigned long long tag = (unsigned long long)epoch << 32;
  for (int i = threadIdx.x; i < m * r; i += kThreads) __stcg(e.gz + i, tag | __float_as_uint(zg[i]));
  if (threadIdx.x == 0) *e.ticket = 0u;
}

// A projection-only launch's EC CTA after ec_slice (w4a16_gemm_ec_project): the last one to finish sums the slices
// into e.zout [m][rank] fp32, puts the ticket back to 0 and adds the launch's whole kEcEpochUnit itself (the W4 CTAs
// take no part: it is the only reader). Without `gated`, z itself (no gate; gs: ec_finish_smem_bytes of scratch);
// with it, g ⊙ z, the gate's parameters prefetched into gs by the caller before griddepcontrol.wait (cp.async,
// committed) as for ec_finish, the scratch after them.
template <class Barrier>
__device__ __noinline__ void ec_finish_z(const W4DecEc& e, int m, float* gs, Barrier barrier, bool gated) {
  if (!ec_last_cta(e, barrier)) return;
  W4DecEc g = e;
  if (!gated) g.gate_width = 0;  // ec_gate then leaves z itself in zg
  const int r = e.rank;
  float* zt = gated ? gs + ec_gate_floats(r, g.gate_width) : gs;
  float* zg = zt + m * r;
  if (gated) {
    cp_async_wait<0>();
    barrier();
  }
  ec_gate(g, ec_epoch(e), m, zg, zt, zg + m * r, gs, barrier);
  for (int i = threadIdx.x; i < m * r; i += kThreads) e.zout[i] = zg[i];
  if (threadIdx.x == 0) {
    *e.ticket = 0u;
    ec_leave(e, 0, 1);  // the launch's only reader: the whole unit
  }
}

// A W4 CTA of a compensated matrix, right after its main loop: its first load of g ⊙ z entry threadIdx.x (its
// round trip then overlaps the CTA's own reduction).
__device__ __forceinline__ unsigned long long ec_gz_issue(const W4DecEc& e, int m) {
  return int(threadIdx.x) < m * e.rank ? ld_relaxed_gpu(e.gz + threadIdx.x) : 0ull;
}

// After its reduction: g ⊙ z [m][rank] into zg (shared memory), each entry polled until it carries this launch's
// epoch (pre: ec_gz_issue's load). Every thread of warps 0-7 calls it; ends with barrier().
template <class Barrier>
__device__ __forceinline__ void ec_gz_wait(const W4DecEc& e, uint32_t epoch, int m, float* zg, unsigned long long pre,
                                           Barrier barrier) {
  for (int i = threadIdx.x; i < m * e.rank; i += kThreads) {
    unsigned long long v = i == int(threadIdx.x) ? pre : ld_relaxed_gpu(e.gz + i);
    while (uint32_t(v >> 32) != epoch) {
      __nanosleep(32);
      v = ld_relaxed_gpu(e.gz + i);
    }
    zg[i] = __uint_as_float(uint32_t(v));
  }
  barrier();
}

// B·(g ⊙ z) of rows lo / hi for tokens tok / tok + 1 (bl, bh: the rows of B; z0, z1: the tokens' g ⊙ z, all in
// shared memory, 8-byte / 16-byte aligned; r % 4 == 0): vector loads, four independent sums.
__device__ __forceinline__ void ec_terms(const __nv_bfloat16* bl, const __nv_bfloat16* bh, const float* z0,
                                         const float* z1, int r, bool two, float& e0, float& e1, float& e2,
                                         float& e3) {
  e0 = e1 = e2 = e3 = 0.f;
  for (int j = 0; j < r; j += 4) {
    const uint2 ul = *reinterpret_cast<const uint2*>(bl + j), uh = *reinterpret_cast<const uint2*>(bh + j);
    const float2 l0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ul.x));
    const float2 l1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ul.y));
    const float2 h0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&uh.x));
    const float2 h1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&uh.y));
    const float4 a = *reinterpret_cast<const float4*>(z0 + j);
    e0 = fmaf(l1.y, a.w, fmaf(l1.x, a.z, fmaf(l0.y, a.y, fmaf(l0.x, a.x, e0))));
    e2 = fmaf(h1.y, a.w, fmaf(h1.x, a.z, fmaf(h0.y, a.y, fmaf(h0.x, a.x, e2))));
    if (two) {
      const float4 c = *reinterpret_cast<const float4*>(z1 + j);
      e1 = fmaf(l1.y, c.w, fmaf(l1.x, c.z, fmaf(l0.y, c.y, fmaf(l0.x, c.x, e1))));
      e3 = fmaf(h1.y, c.w, fmaf(h1.x, c.z, fmaf(h0.y, c.y, fmaf(h0.x, c.x, e3))));
    }
  }
}

}  // namespace spear::cuda::w4_detail
