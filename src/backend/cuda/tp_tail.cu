// Fused post-EC tail of a row-parallel linear: P2P dual-write exchange of the partial outputs and partial EC
// projections, rank-order sums, gate, B, residual add and RMSNorm, one kernel per rank, one CTA per token row.
//
// CTA t of rank r at its e-th call (e = epoch[t] + 1, parity p = e & 1):
//   1. with an EC, computes z_r[t] = A_r · xs[t] (warp w: coordinates w, w + 8, ...; fp32) or takes it precomputed,
//      into shared memory; after a barrier stores all of slot (p, r, t)'s z lines (zeros past the EC's rank) into
//      every peer, and y_r[t]'s lines up to H. A line is p2p_reduce.cu's LL line: {4 payload bytes, e, 4 payload
//      bytes, e}, 16 bytes in one store. Its own contribution is not copied: it sums straight from y_part and
//      shared memory;
//      With y_mirrored the rank's W4 GEMM has already stored y's lines from its epilogue (w4a16_gemm_mirrored, in
//      8-byte halves of the same lines, with the same epoch: epoch[t] + 1), and only z's are pushed here;
//   2. (no flags) reads each peer's lines from its own slot (p, q, t) where it needs them, polling each until both
//      epoch words read e: z's lines by the threads that sum z, y's lines in the element loop;
//   3. sums z and y over q = 0..R-1 in rank order in fp32, applies the gate and B, rounds y once to bf16, adds it
//      into x and normalizes the row (the order of add_rms_norm_kernel); thread 0 stores epoch[t] = e.
// The epoch lives in device memory, per row CTA, so a captured CUDA graph replays correctly.
//
// Why this is p2p_reduce.cu's LL argument unchanged: a slot (p, q, t) of a rank has exactly one writer (CTA t of
// rank q) and one reader (CTA t of this rank), because CTA t always owns row t whatever T is, and epoch[t] counts
// exactly the calls in which CTA t ran, on every rank alike (every rank makes the same calls with the same T). CTA t
// of rank r at epoch e + 2 rewrites q's slot (p, r, t), which q's CTA t read at epoch e; before it starts, r's CTA t
// finished epoch e + 1, which read lines q's CTA t wrote at epoch e + 1 in a kernel that started (in q's stream
// order) after q's kernel of epoch e finished all its reads. Every line a CTA reads was written in every call of
// the writer (all z lines; y's lines up to H, the same H in every call), so a line holds e or e - 2, never a match
// from an older call; two parities keep a line of e + 1 from overwriting one of e that has not been read yet.
//
// Deadlock freedom: a CTA waits only for the same row CTA of the other ranks, never for a CTA of its own grid;
// at most 64 CTAs of 256 threads per rank, all resident at once (2 per SM by the launch bounds: 264 on an H200),
// so the tests' 2 and 3 ranks simulated on one GPU (192 CTAs) still run together.
//
// Bit-exactness with add_rms_norm_bf16 (one rank, no EC): the vector path (H % 8 == 0, 16-byte aligned x, y, w,
// h) processes the 8-element groups t, t + 256, ... per thread and the scalar path the elements t, t + 256, ...,
// as add_rms_norm_kernel does, with the same block reduction, so the sum of squares sees the same operands in the
// same order; y is the first rank's value unchanged (no 0 + y, which would turn -0 into +0).
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/peer_sync.cuh"
#include "backend/cuda/row_norm.cuh"
#include "backend/cuda/tp_tail.h"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kTpTailMaxRanks <= 32, "one thread of the first warp per peer");
static_assert(kTpTailMaxRank == 16 * 4, "ec_chunk: a half-warp of 4 columns per lane covers a row of B");
static_assert(kTpTailMaxRank % kWarps == 0, "A · xs: the same number of coordinates per warp");
// Rows of B·(g ⊙ z) computed per pass into shared memory (8 KB, so that the gate's weights fit beside it under the
// 48 KB of static shared memory). A multiple of 8 · kThreads, so that the element loop visits each thread's groups
// (t, t + 256, ...) in the same order as add_rms_norm_kernel across passes.
constexpr int kChunk = 2048;
static_assert(kChunk % (8 * kThreads) == 0, "whole rounds of 8-element groups per pass");

using peer::globaltimer_ns;
using peer::ld_volatile_v4;
using peer::st_volatile_v4;

constexpr int kLineBytes = 16;  // an LL line: 8 payload bytes, the epoch twice

// 4-byte asynchronous copy global -> shared (cp.async): the gate's weights travel while the row is exchanged.
__device__ __forceinline__ void cp_async4(float* dst, const float* src) {
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

using row_norm::block_sum;

// Butterfly step at xor offset O over a half-warp (then O / 2, ..., 1): a lane keeps the half of its values whose
// index has bit O equal to its own lane bit, sends the other half to its partner and adds what the partner sent for
// the kept ones. A template, so that every index is a constant (v stays in registers).
template <int O, int N>
__device__ __forceinline__ void butterfly(float (&v)[N], int l) {
  const bool upper = (l & O) != 0;
#pragma unroll
  for (int i = 0; i < O; ++i) {
    const float keep = upper ? v[i + O] : v[i];
    const float send = upper ? v[i] : v[i + O];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
  if constexpr (O > 1) butterfly<O / 2>(v, l);
}

// d[n - n0] = Σ_j B[n][j] · zg[j] for the rows n of [n0, n0 + count), into shared memory. A half-warp reads a row
// whole (16 lanes · 4 columns = kTpTailMaxRank), the two halves adjacent rows: one 16-byte load per lane moves 512
// contiguous bytes at r = 64. Each warp issues the loads of 32 rows before using any (64 KB in flight per SM: the
// loop is bound by L2 bandwidth, not latency), then a transposing butterfly over the 16 lanes (8 + 4 + 2 + 1
// shuffles for 16 rows) leaves row 2·l + half of the batch in lane l of each half. Measured on an H200, whole kernel,
// one rank, T = 1, H = 4096, r = 64, static: this 15 µs (no EC: 3.2 µs; the floor is one SM's L2 bandwidth for
// H · r · 4 = 1 MB); one thread per row, the element loop's mapping (every load instruction touches 32 rows' cache
// lines) 39 µs; two rows per warp step (latency bound) 73 µs; these batches with a branch around each load 54 µs.
// Each lane sums its 4 columns in order and the butterfly is a fixed tree, whatever the alignment of B (kBVec only
// selects one 16-byte load instead of four scalar ones), so every rank computes the same bits.
template <bool kBVec>
__device__ __forceinline__ void ec_chunk(const float* __restrict__ B, int r, int n0, int count, const float (&zg)[4],
                                         float* s_d) {
  constexpr int kBatch = 16;  // row pairs per warp per step
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int half = lane / 16, l = lane % 16, c = 4 * l;
  for (int base = warp * 2 * kBatch; base < count; base += kWarps * 2 * kBatch) {  // uniform per warp
    float v[kBatch];
    // No branch around the loads (it serializes them): rows past the end and columns past r load a valid address
    // and contribute nothing (zg is 0 past r; rows past the end are not stored).
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = base + 2 * i + half;
      const float* brow = B + size_t(n0 + min(row, count - 1)) * r;
      float4 b;
      if constexpr (kBVec) {  // r % 4 == 0: columns c..c+3 are all in range or all out
        b = __ldg(reinterpret_cast<const float4*>(brow + min(c, r - 4)));
      } else {
        b = make_float4(__ldg(brow + min(c, r - 1)), __ldg(brow + min(c + 1, r - 1)), __ldg(brow + min(c + 2, r - 1)),
                        __ldg(brow + min(c + 3, r - 1)));
      }
      float d = b.x * zg[0];
      d += b.y * zg[1];
      d += b.z * zg[2];
      d += b.w * zg[3];
      v[i] = d;
    }
    butterfly<kBatch / 2>(v, l);
    const int row = base + 2 * l + half;  // v[0] is now the sum for pair l of the batch
    if (row < count) s_d[row] = v[0];
  }
}

// ec_chunk over the bf16 copy of B (CudaEc::B16; rank r % 8 == 0, rows 16-byte aligned), the form the fused decode
// launch reads too: half the bytes, and no lane idle at small ranks. L lanes share a row (8 columns each, L = r / 8
// rounded up to a power of two), so one load instruction of a warp covers 32 / L rows (r = 16: 16 rows, 512
// contiguous bytes); each lane issues kBatch loads before using any, then the L lanes of a row meet in a fixed
// shuffle tree (the same bits on every rank). zs: g ⊙ z in shared memory.
template <int L>
__device__ __forceinline__ void ec_chunk_b16(const bf16* __restrict__ B, int r, int n0, int count,
                                             const float* zs, float* s_d) {
  constexpr int kRowsPerLoad = 32 / L, kBatch = 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane % L, rl = lane / L;
  const int c = min(8 * sub, r - 8);  // lanes past r re-read the last columns and weigh them 0
  float z[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) z[k] = 8 * sub + k < r ? zs[c + k] : 0.f;
  for (int base = warp * kRowsPerLoad * kBatch; base < count; base += kWarps * kRowsPerLoad * kBatch) {
    uint4 b[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = min(base + i * kRowsPerLoad + rl, count - 1);
      b[i] = __ldg(reinterpret_cast<const uint4*>(B + size_t(n0 + row) * r + c));
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bf162* bh = reinterpret_cast<const bf162*>(&b[i]);
      float d = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(bh[k]);
        d = fmaf(f.x, z[2 * k], d);
        d = fmaf(f.y, z[2 * k + 1], d);
      }
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      const int row = base + i * kRowsPerLoad + rl;
      if (sub == 0 && row < count) s_d[row] = d;
    }
  }
}

// Polls the LL line at `at` (written by rank `src` for row t) until both epoch words read e; traps after
// p.timeout_ns (counted from t0) with a message.
__device__ __forceinline__ uint2 poll_line(const unsigned char* at, uint32_t e, const TpTailPeers& p, int rank, int t,
                                           int src, uint64_t t0) {
  uint4 v = ld_volatile_v4(at);
  uint32_t spins = 0;
  while (v.y != e || v.w != e) {
    if (p.timeout_ns && (++spins & 1023u) == 0 && globaltimer_ns() - t0 > p.timeout_ns) {
      printf("tp tail: rank %d row %d timed out waiting for rank %d (epoch %u, line reads %u %u)\n", rank, t, src, e,
             v.y, v.w);
      __trap();
    }
    v = ld_volatile_v4(at);
  }
  return make_uint2(v.x, v.z);
}

// Slot (parity, src, row) of a rank's staging.
__device__ __forceinline__ unsigned char* slot_of(unsigned char* staging, const TpTailPeers& p, int parity, int src,
                                                  int row) {
  return staging + ((int64_t(parity) * p.ranks + src) * p.max_rows + row) * p.slot_bytes;
}

// Everything that is not a pointer to row data: one struct so the kernel's parameter list stays short.
struct Geometry {
  int H;
  float eps;
  bool a_vec;       // A rows and xs rows: 16-byte aligned, ec.in % 8 == 0
  bool b_vec;       // B rows: 16-byte aligned float4s (rank % 4 == 0); selects the kernel's kBVec
  int b16_lanes;    // > 0: B·(g ⊙ z) from ec.B16 with this many lanes per row (ec_chunk_b16), else from ec.B
  bool y_mirrored;  // the GEMM stored this rank's y lines into the peers (tp_tail.h)
};

// minBlocks 2: at most 128 registers (all used, no spills), so that 2 CTAs fit per SM and the tests' 2-3 simulated
// ranks' grids run on one GPU at once. Occupancy is no concern otherwise: at most 64 CTAs per rank. (With no second
// bound ptxas picked 48 registers and spilled.)
template <bool kVec, bool kBVec>
__global__ void __launch_bounds__(kThreads, 2)
    tp_tail_kernel(const bf16* __restrict__ y_part, const bf16* __restrict__ xs, bf16* __restrict__ x,
                   const bf16* __restrict__ nw, bf16* __restrict__ hout, Geometry geo, TpTailEc ec, TpTailPeers p,
                   int rank) {
  pdl_enter();
  __shared__ float s_z[kTpTailMaxRank];  // z_rank, then Σ z, then g ⊙ z
  __shared__ float s_h[kTpTailMaxGate];  // silu(W1·z + b1)
  __shared__ float s_d[kChunk];          // B·(g ⊙ z) of the current pass
  // The gate's parameters, rows padded by one float so that the threads of a gate phase, one row each, hit distinct
  // banks. (Read from global memory in the gate phases the gate took 2.4 µs, w = 16, r = 64; copied ahead, 1.2.)
  __shared__ float s_w1[kTpTailMaxGate * (kTpTailMaxRank + 1)];  // [w][r + 1]
  __shared__ float s_w2[kTpTailMaxRank * (kTpTailMaxGate + 1)];  // [r][w + 1]
  __shared__ float s_b1[kTpTailMaxGate], s_b2[kTpTailMaxRank];
  __shared__ uint32_t s_epoch;
  const int t = blockIdx.x;
  const int H = geo.H;
  const int R = p.ranks;
  const int r = ec.rank;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bf16* yr = y_part + size_t(t) * H;

  uint32_t e = 0;
  int parity = 0;
  if (R > 1) {
    if (threadIdx.x == 0) s_epoch = p.epoch[t] + 1;
    __syncthreads();
    e = s_epoch;
    parity = int(e & 1u);
  }

  // 0. Start copying the gate's parameters (read-only model weights) into shared memory; waited for at the gate.
  if (r > 0 && ec.gate_width > 0) {
    const int w = ec.gate_width;
    for (int f = threadIdx.x; f < w * r; f += kThreads) {
      cp_async4(&s_w1[(f / r) * (r + 1) + f % r], ec.W1 + f);
      cp_async4(&s_w2[(f / w) * (w + 1) + f % w], ec.W2 + f);
    }
    if (threadIdx.x < w) cp_async4(&s_b1[threadIdx.x], ec.b1 + threadIdx.x);
    if (threadIdx.x < r) cp_async4(&s_b2[threadIdx.x], ec.b2 + threadIdx.x);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }

  // 1a. z_rank[t] into shared memory: given (ec.z), or A_rank · xs[t] (lanes split k, a fixed shuffle tree sums
  // them: deterministic).
  auto publish_z = [&](int j, float v) { s_z[j] = v; };
  if (r > 0 && ec.z) {
    if (threadIdx.x < r) publish_z(threadIdx.x, ec.z[size_t(t) * r + threadIdx.x]);
  } else if (r > 0) {
    // Warp w computes coordinates w, w + 8, ... (at most kZPerWarp) together, so one pass over xs[t] serves them
    // all and their rows of A are in flight at once (k = 2048, r = 64: 5 µs more than a given z; one coordinate
    // at a time took 8 µs).
    constexpr int kZPerWarp = kTpTailMaxRank / kWarps;
    const bf16* xr = xs + size_t(t) * ec.in;
    const int mc = (r - warp + kWarps - 1) / kWarps;  // this warp's coordinates (warp-uniform)
    float acc[kZPerWarp];
#pragma unroll
    for (int m = 0; m < kZPerWarp; ++m) acc[m] = 0.f;
    if (geo.a_vec) {
      const uint4* a4 = reinterpret_cast<const uint4*>(ec.A);
      const int n4 = ec.in / 8;
#pragma unroll 2
      for (int g = lane; g < n4; g += 32) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xr) + g);
        uint4 av[kZPerWarp];
        // Unconditional loads (a clamped row past r; discarded at the end): a guard per load would serialize them.
#pragma unroll
        for (int m = 0; m < kZPerWarp; ++m) av[m] = __ldg(a4 + size_t(min(warp + kWarps * m, r - 1)) * n4 + g);
        const bf162* xh = reinterpret_cast<const bf162*>(&xv);
#pragma unroll
        for (int m = 0; m < kZPerWarp; ++m) {
          const bf162* ah = reinterpret_cast<const bf162*>(&av[m]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 fa = __bfloat1622float2(ah[k]), fx = __bfloat1622float2(xh[k]);
            acc[m] += fa.x * fx.x;
            acc[m] += fa.y * fx.y;
          }
        }
      }
    } else {
      for (int k = lane; k < ec.in; k += 32) {
        const float xv = __bfloat162float(xr[k]);
#pragma unroll
        for (int m = 0; m < kZPerWarp; ++m)
          acc[m] += __bfloat162float(ec.A[size_t(min(warp + kWarps * m, r - 1)) * ec.in + k]) * xv;
      }
    }
#pragma unroll
    for (int m = 0; m < kZPerWarp; ++m) {
      if (m >= mc) continue;  // warp-uniform: the shuffles below have all 32 lanes
      float v = acc[m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) publish_z(warp + kWarps * m, v);
    }
  }

  __syncthreads();  // s_z complete
  const uint64_t t0 = (R > 1 && p.timeout_ns) ? globaltimer_ns() : 0;
  if (R > 1) {
    // 1b. Every z line (zeros past r) and y's lines up to H, to every peer: 2 coordinates or 4 elements per line.
    const int z_lines = (p.max_rank + 1) / 2, y_lines = (H + 3) / 4;
    for (int i = threadIdx.x; i < z_lines; i += kThreads) {
      const float z0 = 2 * i < r ? s_z[2 * i] : 0.f, z1 = 2 * i + 1 < r ? s_z[2 * i + 1] : 0.f;
      const uint4 v = make_uint4(__float_as_uint(z0), e, __float_as_uint(z1), e);
      for (int q = 0; q < R; ++q)
        if (q != rank) st_volatile_v4(slot_of(p.staging[q], p, parity, rank, t) + p.z_offset + i * kLineBytes, v);
    }
    for (int l = geo.y_mirrored ? y_lines : int(threadIdx.x); l < y_lines; l += kThreads) {
      uint2 w;
      if constexpr (kVec) {  // H % 8 == 0 and y 16-byte aligned: whole, aligned 8-byte groups
        w = reinterpret_cast<const uint2*>(yr)[l];
      } else {
        unsigned short h[4];
        for (int k = 0; k < 4; ++k) h[k] = 4 * l + k < H ? reinterpret_cast<const unsigned short*>(yr)[4 * l + k] : 0;
        w = make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
      }
      const uint4 v = make_uint4(w.x, e, w.y, e);
      for (int q = 0; q < R; ++q)
        if (q != rank) st_volatile_v4(slot_of(p.staging[q], p, parity, rank, t) + l * kLineBytes, v);
    }
  }

  // 4a. z = Σ_q z_q in rank order (the same operands on every rank, hence the same z, gate and correction).
  if (r > 0) {
    if (R > 1) __syncthreads();  // 1b's readers of s_z are done before the sums overwrite it
    if (R > 1 && threadIdx.x < r) {
      const int j = threadIdx.x;
      float z = 0.f;
      for (int src = 0; src < R; ++src) {
        float v = s_z[j];
        if (src != rank) {
          const uint2 w = poll_line(slot_of(p.staging[rank], p, parity, src, t) + p.z_offset + (j / 2) * kLineBytes, e,
                                    p, rank, t, src, t0);
          v = __uint_as_float(j % 2 == 0 ? w.x : w.y);
        }
        z = src == 0 ? v : z + v;
      }
      s_z[j] = z;  // this thread alone reads and writes s_z[j]
    }
    if (ec.gate_width > 0) {
      cp_async_wait_all();
      __syncthreads();
      const int w = ec.gate_width;
      if (threadIdx.x < w) {
        const int i = threadIdx.x;
        float a = s_b1[i];
        for (int j = 0; j < r; ++j) a += s_w1[i * (r + 1) + j] * s_z[j];
        s_h[i] = a / (1.f + expf(-a));
      }
      __syncthreads();
      if (threadIdx.x < r) {
        const int j = threadIdx.x;
        float u = s_b2[j];
        for (int i = 0; i < w; ++i) u += s_w2[j * (w + 1) + i] * s_h[i];
        s_z[j] *= 1.f + tanhf(u);
      }
    }
    __syncthreads();
  }

  // 4b. y = Σ_q y_q (rank order) + B·(g ⊙ z), rounded once to bf16; x += y; sum of squares of the new x. In
  // passes of kChunk elements: B·(g ⊙ z) of the pass first (coalesced, into s_d), then the element loop.
  // Source q's y lines of this row in this rank's staging: line l holds elements 4l .. 4l + 3.
  auto y_line = [&](int src, int l) {
    return poll_line(slot_of(p.staging[rank], p, parity, src, t) + int64_t(l) * kLineBytes, e, p, rank, t, src, t0);
  };
  bf16* xr = x + size_t(t) * H;
  float zg[4] = {0.f, 0.f, 0.f, 0.f};  // this lane's 4 columns of g ⊙ z for ec_chunk
  if (r > 0) {
    const int c = 4 * (lane % 16);
#pragma unroll
    for (int k = 0; k < 4; ++k) zg[k] = c + k < r ? s_z[c + k] : 0.f;
  }
  float ss = 0.f;
  for (int n0 = 0; n0 < H; n0 += kChunk) {
    const int count = min(kChunk, H - n0);
    if (r > 0) {
      if (n0 > 0) __syncthreads();  // the previous pass has read s_d
      switch (geo.b16_lanes) {  // CTA-uniform
        case 1: ec_chunk_b16<1>(ec.B16, r, n0, count, s_z, s_d); break;
        case 2: ec_chunk_b16<2>(ec.B16, r, n0, count, s_z, s_d); break;
        case 4: ec_chunk_b16<4>(ec.B16, r, n0, count, s_z, s_d); break;
        case 8: ec_chunk_b16<8>(ec.B16, r, n0, count, s_z, s_d); break;
        default: ec_chunk<kBVec>(ec.B, r, n0, count, zg, s_d);
      }
      __syncthreads();
    }
    if constexpr (kVec) {
      for (int g = n0 / 8 + threadIdx.x; g < (n0 + count) / 8; g += kThreads) {
        float acc[8] = {};  // (overwritten by source 0: see the note at the top of the file)
        for (int src = 0; src < R; ++src) {
          uint4 v;
          if (src == rank) {
            v = reinterpret_cast<const uint4*>(yr)[g];
          } else {
            const uint2 lo = y_line(src, 2 * g), hi = y_line(src, 2 * g + 1);
            v = make_uint4(lo.x, lo.y, hi.x, hi.y);
          }
          const bf162* vh = reinterpret_cast<const bf162*>(&v);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = __bfloat1622float2(vh[k]);
            acc[2 * k] = src == 0 ? f.x : acc[2 * k] + f.x;
            acc[2 * k + 1] = src == 0 ? f.y : acc[2 * k + 1] + f.y;
          }
        }
        if (r > 0) {
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[k] += s_d[g * 8 + k - n0];
        }
        uint4 a = reinterpret_cast<const uint4*>(xr)[g];
        bf162* ah = reinterpret_cast<bf162*>(&a);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 fa = __bfloat1622float2(ah[k]);
          const float2 fb = __bfloat1622float2(__floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]));
          ah[k] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
          const float2 f = __bfloat1622float2(ah[k]);
          ss += f.x * f.x;
          ss += f.y * f.y;
        }
        reinterpret_cast<uint4*>(xr)[g] = a;
      }
    } else {
      for (int i = n0 + threadIdx.x; i < n0 + count; i += kThreads) {
        float acc = 0.f;
        for (int src = 0; src < R; ++src) {
          bf16 b = yr[i];
          if (src != rank) {
            const uint2 w = y_line(src, i / 4);
            const uint32_t word = (i % 4) < 2 ? w.x : w.y;
            const unsigned short bits = (i % 2) == 0 ? (unsigned short)(word & 0xffffu) : (unsigned short)(word >> 16);
            b = __ushort_as_bfloat16(bits);
          }
          const float v = __bfloat162float(b);
          acc = src == 0 ? v : acc + v;
        }
        if (r > 0) acc += s_d[i - n0];
        const bf16 s = __float2bfloat16_rn(__bfloat162float(xr[i]) + __bfloat162float(__float2bfloat16_rn(acc)));
        xr[i] = s;
        const float v = __bfloat162float(s);
        ss += v * v;
      }
    }
  }
  const float inv = rsqrtf(block_sum<kThreads>(ss) / float(H) + geo.eps);

  // 4c. h = w · (x · inv), as rms_norm.cu does it.
  row_norm::scale_row<kVec, kThreads>(xr, nw, hout + size_t(t) * H, H, inv);
  if (R > 1 && threadIdx.x == 0) p.epoch[t] = e;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

TpTailRankBuffers tp_tail_alloc_rank_buffers(int device, int ranks, int max_h, int max_rank, int max_rows) {
  SPEAR_CHECK(ranks >= 2 && ranks <= kTpTailMaxRanks, "tp tail: {} ranks (supported: 2..{})", ranks, kTpTailMaxRanks);
  SPEAR_CHECK(max_rows >= 1 && max_rows <= kTpTailMaxRows, "tp tail: max_rows {} out of [1, {}]", max_rows,
              kTpTailMaxRows);
  SPEAR_CHECK(max_h >= 1, "tp tail: max_h {} must be at least 1", max_h);
  SPEAR_CHECK(max_rank >= 0 && max_rank <= kTpTailMaxRank, "tp tail: max_rank {} out of [0, {}]", max_rank,
              kTpTailMaxRank);
  TpTailRankBuffers b;
  b.device = device;
  b.ranks = ranks;
  b.max_rows = max_rows;
  b.max_h = max_h;
  b.max_rank = max_rank;
  // LL lines: 4 bf16 of y or 2 fp32 of z per 16 bytes.
  b.z_offset = int64_t((max_h + 3) / 4) * kLineBytes;
  b.slot_bytes = b.z_offset + int64_t((max_rank + 1) / 2) * kLineBytes;
  const size_t staging_bytes = align_up(size_t(2) * ranks * max_rows * size_t(b.slot_bytes), 256);
  const size_t epoch_bytes = align_up(size_t(max_rows) * sizeof(uint32_t), 256);
  b.bytes = staging_bytes + epoch_bytes;
  DeviceScope scope(device);
  // Loaded now, not at the first launch (see p2p_alloc_rank_buffers: lazy loading and spinning kernels).
  cudaFuncAttributes attr;
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, tp_tail_kernel<true, true>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, tp_tail_kernel<true, false>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, tp_tail_kernel<false, true>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, tp_tail_kernel<false, false>));
  SPEAR_CUDA_CHECK(cudaMalloc(&b.base, b.bytes));
  // Synchronous, and complete before any stream (blocking or not) can launch the kernel on these buffers.
  SPEAR_CUDA_CHECK(cudaMemset(b.base, 0, b.bytes));
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  auto* base = static_cast<unsigned char*>(b.base);
  b.staging = base;
  b.epoch = reinterpret_cast<uint32_t*>(base + staging_bytes);
  return b;
}

void tp_tail_free_rank_buffers(TpTailRankBuffers& b) {
  if (b.base) {
    DeviceScope scope(b.device);
    SPEAR_CUDA_CHECK(cudaFree(b.base));
  }
  b = TpTailRankBuffers{};
}

TpTailPeers tp_tail_peers_of(const TpTailRankBuffers& mine) {
  TpTailPeers p;
  p.ranks = mine.ranks;
  p.max_rows = mine.max_rows;
  p.max_h = mine.max_h;
  p.max_rank = mine.max_rank;
  p.slot_bytes = mine.slot_bytes;
  p.z_offset = mine.z_offset;
  p.epoch = mine.epoch;
  return p;
}

W4PeerMirror tp_tail_mirror(const TpTailPeers& peers, int rank) {
  static_assert(kW4MirrorMaxRanks >= kTpTailMaxRanks, "a mirror holds every rank's staging");
  W4PeerMirror m;
  for (int q = 0; q < peers.ranks; ++q) m.staging[q] = peers.staging[q];
  m.epoch = peers.epoch;
  m.ranks = peers.ranks;
  m.rank = rank;
  m.max_rows = peers.max_rows;
  m.slot_bytes = peers.slot_bytes;
  return m;
}

TpTailPeers tp_tail_peers_in_process(const std::vector<TpTailRankBuffers>& all, int rank) {
  const int ranks = int(all.size());
  SPEAR_CHECK(ranks >= 2 && ranks <= kTpTailMaxRanks, "tp tail: {} ranks (supported: 2..{})", ranks, kTpTailMaxRanks);
  SPEAR_CHECK(rank >= 0 && rank < ranks, "tp tail: rank {} out of [0, {})", rank, ranks);
  const TpTailRankBuffers& b0 = all[0];
  TpTailPeers p = tp_tail_peers_of(all[size_t(rank)]);
  for (int q = 0; q < ranks; ++q) {
    const TpTailRankBuffers& b = all[size_t(q)];
    SPEAR_CHECK(
        b.base && b.ranks == ranks && b.max_rows == b0.max_rows && b.max_h == b0.max_h && b.max_rank == b0.max_rank,
        "tp tail: rank {}'s buffers ({} ranks, {} rows, H {}, rank {}) do not match rank 0's ({}, {}, {}, {}) "
        "or were not allocated",
        q, b.ranks, b.max_rows, b.max_h, b.max_rank, ranks, b0.max_rows, b0.max_h, b0.max_rank);
    p.staging[q] = b.staging;
  }
  return p;
}

void tp_tail_bf16(const __nv_bfloat16* y_part, const __nv_bfloat16* xs, const TpTailEc* ec, __nv_bfloat16* x,
                  const __nv_bfloat16* norm_w, __nv_bfloat16* h, int T, int H, float eps, const TpTailPeers& peers,
                  int rank, cudaStream_t stream, bool y_mirrored) {
  const int R = peers.ranks;
  SPEAR_CHECK(R >= 1 && R <= kTpTailMaxRanks, "tp tail: {} ranks (supported: 1..{})", R, kTpTailMaxRanks);
  SPEAR_CHECK(rank >= 0 && rank < R, "tp tail: rank {} out of [0, {})", rank, R);
  SPEAR_CHECK(T >= 0 && H >= 1, "tp tail: bad shape [{}, {}]", T, H);
  const int r = ec ? ec->rank : 0;
  SPEAR_CHECK(r >= 0 && r <= kTpTailMaxRank, "tp tail: EC rank {} out of [0, {}]", r, kTpTailMaxRank);
  if (R > 1) {
    // Rows beyond max_rows would need slots nobody allocated; a different geometry on another rank would put its
    // stores elsewhere (tp_tail_peers_in_process checks they agree).
    SPEAR_CHECK(T <= peers.max_rows && H <= peers.max_h && r <= peers.max_rank,
                "tp tail: [{}, {}] with EC rank {} exceeds the staging ({} rows, H {}, rank {})", T, H, r,
                peers.max_rows, peers.max_h, peers.max_rank);
    SPEAR_CHECK(peers.epoch && peers.slot_bytes % 16 == 0 && peers.z_offset % 16 == 0 &&
                    peers.z_offset >= int64_t((peers.max_h + 3) / 4) * kLineBytes &&
                    peers.slot_bytes >= peers.z_offset + int64_t((peers.max_rank + 1) / 2) * kLineBytes,
                "tp tail: inconsistent staging geometry (slot {} bytes, z at {})", peers.slot_bytes, peers.z_offset);
    for (int q = 0; q < R; ++q) SPEAR_CHECK(peers.staging[q], "tp tail: rank {}'s staging missing", q);
  } else {
    SPEAR_CHECK(T <= kTpTailMaxRows, "tp tail: {} rows (at most {})", T, kTpTailMaxRows);
  }
  if (T == 0) return;  // every rank skips alike: the epochs stay in step
  SPEAR_CHECK(y_part && x && norm_w && h, "tp tail: null y, x, norm weight or output");
  TpTailEc e = ec ? *ec : TpTailEc{};
  if (r > 0) {
    SPEAR_CHECK((e.B || e.B16) && (e.z || (e.in >= 1 && e.A && xs)),
                "tp tail: EC without B, or without z or A and input (in = {})", e.in);
    SPEAR_CHECK(e.gate_width >= 0 && e.gate_width <= kTpTailMaxGate, "tp tail: gate width {} out of [0, {}]",
                e.gate_width, kTpTailMaxGate);
    if (e.gate_width > 0) SPEAR_CHECK(e.W1 && e.b1 && e.W2 && e.b2, "tp tail: gated EC without W1, b1, W2 or b2");
  } else {
    e = TpTailEc{};
  }
  Geometry geo;
  geo.H = H;
  geo.eps = eps;
  geo.y_mirrored = y_mirrored && R > 1;
  geo.a_vec = r > 0 && !e.z && e.in % 8 == 0 && aligned16(e.A) && aligned16(xs);
  geo.b_vec = r > 0 && r % 4 == 0 && aligned16(e.B);
  geo.b16_lanes = 0;
  if (r > 0 && e.B16 && r % 8 == 0 && aligned16(e.B16)) {
    geo.b16_lanes = 1;
    while (8 * geo.b16_lanes < r) geo.b16_lanes *= 2;
  }
  // The same test as add_rms_norm_bf16 (vec_ok), so that one rank without EC takes the same path as it.
  const bool vec = H % 8 == 0 && aligned16(x) && aligned16(y_part) && aligned16(norm_w) && aligned16(h);
  auto kernel = vec ? (geo.b_vec ? tp_tail_kernel<true, true> : tp_tail_kernel<true, false>)
                    : (geo.b_vec ? tp_tail_kernel<false, true> : tp_tail_kernel<false, false>);
  launch_kernel(kernel, T, kThreads, 0, stream, y_part, xs, x, norm_w, h, geo, e, peers, rank);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void tp_tail_reference(int ranks, int T, int H, const uint16_t* const* y_parts, const uint16_t* const* xs_parts,
                       const TpTailEcHost* ec, uint16_t* x, const uint16_t* norm_w, uint16_t* h, float eps) {
  const int r = ec ? ec->rank : 0, w = ec ? ec->gate_width : 0;
  std::vector<double> z(size_t(std::max(r, 1))), hg(size_t(std::max(w, 1)));
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < r; ++j) {
      double acc = 0;
      for (int q = 0; q < ranks; ++q) {
        const int k_q = ec->in[size_t(q)];
        const float* a = ec->A[size_t(q)] + size_t(j) * k_q;
        const uint16_t* xr = xs_parts[q] + size_t(t) * k_q;
        for (int k = 0; k < k_q; ++k) acc += double(bf16_to_f32(f32_to_bf16(a[k]))) * bf16_to_f32(xr[k]);
      }
      z[size_t(j)] = acc;
    }
    if (w > 0) {
      for (int i = 0; i < w; ++i) {
        double a = ec->b1[i];
        for (int j = 0; j < r; ++j) a += double(ec->W1[size_t(i) * r + j]) * z[size_t(j)];
        hg[size_t(i)] = a / (1.0 + std::exp(-a));
      }
      for (int j = 0; j < r; ++j) {
        double u = ec->b2[j];
        for (int i = 0; i < w; ++i) u += double(ec->W2[size_t(j) * w + i]) * hg[size_t(i)];
        z[size_t(j)] *= 1.0 + std::tanh(u);
      }
    }
    uint16_t* xr = x + size_t(t) * H;
    double ss = 0;
    for (int n = 0; n < H; ++n) {
      double acc = 0;
      for (int q = 0; q < ranks; ++q) acc += bf16_to_f32(y_parts[q][size_t(t) * H + n]);
      for (int j = 0; j < r; ++j) acc += double(ec->B[size_t(n) * r + j]) * z[size_t(j)];
      const float yb = bf16_to_f32(f32_to_bf16(float(acc)));
      xr[n] = f32_to_bf16(bf16_to_f32(xr[n]) + yb);
      const double v = bf16_to_f32(xr[n]);
      ss += v * v;
    }
    const double inv = 1.0 / std::sqrt(ss / H + double(eps));
    for (int n = 0; n < H; ++n)
      h[size_t(t) * H + n] = f32_to_bf16(float(double(bf16_to_f32(norm_w[n])) * (bf16_to_f32(xr[n]) * inv)));
  }
}

}  // namespace spear::cuda
