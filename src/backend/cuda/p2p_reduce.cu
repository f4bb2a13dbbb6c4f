// P2P dual-write all-reduce: one kernel per rank, CTA b of every rank handles the same slice of the vector.
//
// CTA b of rank r at its e-th call (e = epoch[b] + 1, parity p = e & 1):
//   1. stores its slice of x into staging[p][r] of every peer q (remote 16-byte stores over NVLink) and keeps it
//      in registers as its own contribution;
//   2. __syncthreads, then one thread per peer q sets q's flags[p][r][b] = e with st.release.sys (cumulative
//      over the barrier: every thread's stores of step 1 are visible to q before the flag is);
//   3. the same thread spins with ld.acquire.sys until its own flags[p][q][b] == e, then __syncthreads;
//   4. every thread sums, for its elements, q = 0..R-1 in rank order in fp32 (its own registers for q == r,
//      its own staging[p][q] otherwise) and writes out (bf16: rounded once); thread 0 stores epoch[b] = e.
// The epoch lives in device memory, per CTA, so a captured CUDA graph replays correctly (no host argument).
//
// Why two parities make reuse safe. CTA b of rank r at epoch e + 2 rewrites q's staging[p][r] slice b and
// flags[p][r][b], which q's CTA b read at epoch e. Before it starts, r's CTA b finished epoch e + 1 (an earlier
// kernel of r's stream), which waited for q's flag of epoch e + 1; q's CTA b raised that flag in a kernel that
// started, in q's stream order, after q's kernel of epoch e had finished all its reads. One parity would not do:
// r could push epoch e + 1 while q still reads epoch e, and its flag e + 1 could overwrite the flag e that q has
// not seen yet (q would spin forever). Flags compare for equality with e, so 2^32 wrap-around is harmless.
//
// Why the slices are fixed (CTA b always owns elements [b, b + 1) · kP2pBlockElems, whatever n): the argument
// above is per CTA, and epoch[b] counts only the calls in which CTA b ran. If the slicing followed n, a CTA of
// one call could write a region that a different CTA, with another epoch parity, of a call of another size still
// reads. With fixed slices a region has one reader and one writer CTA on every rank, and all ranks' epoch[b]
// stay equal as long as all ranks make the same sequence of calls. The slices are fixed in bytes: an fp32 call's
// CTA b owns kP2pBlockElems / 2 elements, the same bytes [b, b + 1) · 2 · kP2pBlockElems of every staging area
// as a bf16 call's CTA b, so the argument holds across calls of both types.
//
// Deadlock freedom: a CTA waits only for the same CTA index on the other ranks, never for another CTA of its
// own grid; at most capacity / kP2pBlockElems CTAs of 256 threads run, which all fit on the GPU at once.
//
// Launched like the backend's other kernels (launch_kernel: programmatic dependent launch when enabled), so its
// launch latency hides behind the previous kernel of the stream. pdl_enter() is its first statement: no memory is
// touched before the previous kernel (e.g. the previous all-reduce) has completed, so "kernel i + 1 runs after
// kernel i" above still holds.
//
// The LL protocol (p2p_ll_kernel, below) keeps the fixed slices, the per-CTA epochs in device memory and the two
// parities, in its own staging and epoch counters; what replaces the flags is the epoch inside every line. CTA b of
// rank r at epoch e writes line l of its slice to every peer q as {d0, e, d1, e} (d0, d1: 8 payload bytes) and polls
// line l of its own staging area of each source q until both epoch words read e, then sums in rank order:
//   * no fence and no flag round trip: a line is usable the moment it lands (NVLink delivers each aligned 8-byte
//     half whole, so a half whose epoch word reads e carries this call's data word);
//   * a CTA writes every line of its slice on every call, zeros past n: so a line of area (p, q, b) holds either
//     this call's epoch or that of the call two before (e - 2, never equal to e, even across 2^32 wrap-around), and
//     never a value from a call that wrote fewer lines;
//   * reuse is safe by the argument above: before r's CTA b at e + 2 rewrites q's area (p, r, b), r's CTA b at e + 1
//     read at least one line q's CTA b wrote at e + 1, in a kernel q started after its kernel of epoch e (which
//     read that area) had finished.
#include <algorithm>
#include <cstdio>
#include <type_traits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/p2p_reduce.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/peer_sync.cuh"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
constexpr int kThreads = 256;
constexpr int kVecBytes = 16;
// A CTA's slice in bytes, whatever the element type: 2 bytes · kP2pBlockElems.
constexpr int64_t kSliceBytes = kP2pBlockElems * int64_t(sizeof(bf16));
constexpr int kVecPerThread = int(kSliceBytes / (kThreads * kVecBytes));  // 16-byte vectors per thread
static_assert(kVecPerThread * kThreads * kVecBytes == kSliceBytes, "a CTA's slice is whole vectors of every thread");
static_assert(kP2pMaxRanks <= 32, "one thread of the first warp per peer");

// Elements of T in one 16-byte vector and in one CTA's slice (the same bytes for bf16 and fp32).
template <typename T>
constexpr int kPerVec = int(kVecBytes / sizeof(T));
template <typename T>
constexpr int64_t kSliceElems = kSliceBytes / int64_t(sizeof(T));

using peer::globaltimer_ns;
using peer::ld_acquire_sys;
using peer::ld_volatile_v4;
using peer::st_release_sys;
using peer::st_v4;
using peer::st_volatile_v4;

// LL geometry: a line is 16 bytes (8 payload), a CTA's slice 2 · kP2pLlSliceBytes bytes of lines.
constexpr int kLlLineBytes = 16;
constexpr int64_t kLlCtaBytes = 2 * kP2pLlSliceBytes;
constexpr int kLlLinesPerThread = int(kP2pLlSliceBytes / 8 / kThreads);
static_assert(kLlLinesPerThread * kThreads * 8 == kP2pLlSliceBytes, "whole lines of every thread per LL slice");

// The bits of one element, for the element-wise (unaligned or partial) accesses.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, unsigned short, unsigned int>;

// One vector of elements at p, of which `valid` (>= 1) are in range; zeros past the end. 16-byte load when allowed.
template <typename T>
__device__ __forceinline__ uint4 load_vec(const T* p, int64_t valid, bool aligned) {
  constexpr int kN = kPerVec<T>;
  if (aligned && valid >= kN) return *reinterpret_cast<const uint4*>(p);
  uint4 v = make_uint4(0, 0, 0, 0);
  Bits<T>* h = reinterpret_cast<Bits<T>*>(&v);
  const Bits<T>* s = reinterpret_cast<const Bits<T>*>(p);
#pragma unroll
  for (int k = 0; k < kN; ++k)
    if (k < valid) h[k] = s[k];
  return v;
}

// Rounds the sums to T (bf16: nearest even; fp32: as they are) and stores the `valid` first ones.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&acc)[kPerVec<T>], int64_t valid, bool aligned) {
  constexpr int kN = kPerVec<T>;
  uint4 o;
  if constexpr (sizeof(T) == 2) {
    bf162* oh = reinterpret_cast<bf162*>(&o);
#pragma unroll
    for (int j = 0; j < kN / 2; ++j) oh[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
  } else {
    o = make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]), __float_as_uint(acc[3]));
  }
  if (aligned && valid >= kN) {
    st_v4(p, o);
    return;
  }
  const Bits<T>* h = reinterpret_cast<const Bits<T>*>(&o);
  Bits<T>* d = reinterpret_cast<Bits<T>*>(p);
#pragma unroll
  for (int k = 0; k < kN; ++k)
    if (k < valid) d[k] = h[k];
}

// Adds the elements packed in kWords 32-bit words (bf16 pairs or fp32s) into acc, in order.
template <typename T, int kWords>
__device__ __forceinline__ void add_words(float (&acc)[kWords * 4 / sizeof(T)], const uint32_t* w) {
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    if constexpr (sizeof(T) == 2) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const bf162*>(&w[k]));
      acc[2 * k] += f.x;
      acc[2 * k + 1] += f.y;
    } else {
      acc[k] += __uint_as_float(w[k]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void add_vec(float (&acc)[kPerVec<T>], const uint4& v) {
  add_words<T, 4>(acc, reinterpret_cast<const uint32_t*>(&v));
}

// Grid: one CTA per kSliceElems<T> slice of [0, n), i.e. per kSliceBytes of the vector whatever T is, so bf16 and
// fp32 calls pair the same staging bytes, flags and epoch with the same CTA index. No __restrict__: out may alias
// x (each thread reads its x elements into registers before it writes the same elements of out).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    p2p_allreduce_kernel(const T* x, T* out, int64_t n, P2pPeers p, int rank, bool x_aligned, bool out_aligned) {
  pdl_enter();
  constexpr int kN = kPerVec<T>;
  const int b = blockIdx.x;
  const int ranks = p.ranks;
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = p.epoch[b] + 1;
  __syncthreads();
  const uint32_t e = s_epoch;
  const int parity = int(e & 1u);
  const int64_t slice = int64_t(b) * kSliceElems<T>;
  // Where source `src` of this parity lands in a rank's staging (same layout on every rank), in elements of T:
  // an area is `capacity` bf16 elements, i.e. capacity · 2 / sizeof(T) elements of T.
  const int64_t area = p.capacity * int64_t(sizeof(bf16)) / int64_t(sizeof(T));
  auto staging_off = [&](int src) { return (int64_t(parity) * ranks + src) * area; };

  // 1. Push this rank's slice to every peer; keep it in registers for the sum.
  uint4 mine[kVecPerThread];
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) {
    const int64_t i = slice + (int64_t(j) * kThreads + threadIdx.x) * kN;
    mine[j] = make_uint4(0, 0, 0, 0);
    if (i < n) {
      mine[j] = load_vec(x + i, n - i, x_aligned);
      for (int q = 0; q < ranks; ++q) {
        if (q == rank) continue;
        T* dst = reinterpret_cast<T*>(p.staging[q]) + staging_off(rank) + i;
        st_v4(dst, mine[j]);  // staging slices are 16-byte aligned
      }
    }
  }
  __syncthreads();

  // 2-3. Thread q (q != rank) tells peer q that our slice has landed, then waits for peer q's slice here.
  const int q = threadIdx.x;
  if (q < ranks && q != rank) {
    const int64_t flag_off = (int64_t(parity) * ranks + rank) * p.max_blocks + b;
    st_release_sys(p.flags[q] + flag_off, e);
    const uint32_t* mine_flag = p.flags[rank] + (int64_t(parity) * ranks + q) * p.max_blocks + b;
    const uint64_t t0 = p.timeout_ns ? globaltimer_ns() : 0;
    uint32_t spins = 0;
    while (ld_acquire_sys(mine_flag) != e) {
      if (p.timeout_ns && (++spins & 1023u) == 0 && globaltimer_ns() - t0 > p.timeout_ns) {
        printf("p2p all-reduce: rank %d CTA %d timed out waiting for rank %d (epoch %u, flag %u)\n", rank, b, q, e,
               ld_acquire_sys(mine_flag));
        __trap();
      }
    }
  }
  __syncthreads();  // extends the acquire to every thread of the CTA

  // 4. Sum in rank order. The peers' slices are read through L2 (.cg): they were written by other GPUs.
  const T* local = reinterpret_cast<const T*>(p.staging[rank]);
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) {
    const int64_t i = slice + (int64_t(j) * kThreads + threadIdx.x) * kN;
    if (i < n) {
      float acc[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) acc[k] = 0.f;
      for (int src = 0; src < ranks; ++src) {
        const uint4 v = src == rank ? mine[j] : __ldcg(reinterpret_cast<const uint4*>(local + staging_off(src) + i));
        add_vec<T>(acc, v);
      }
      store_vec(out + i, acc, n - i, out_aligned);
    }
  }
  if (threadIdx.x == 0) p.epoch[b] = e;
}

// The 8 payload bytes of line i0 (elements [i0, i0 + 8 / sizeof(T)) of v, zeros past n) as two words.
template <typename T>
__device__ __forceinline__ uint2 load_payload(const T* v, int64_t i0, int64_t n, bool aligned8) {
  constexpr int kN = int(8 / sizeof(T));
  if (aligned8 && i0 + kN <= n) return *reinterpret_cast<const uint2*>(v + i0);
  uint2 w = make_uint2(0, 0);
  Bits<T>* h = reinterpret_cast<Bits<T>*>(&w);
  const Bits<T>* src = reinterpret_cast<const Bits<T>*>(v);
#pragma unroll
  for (int k = 0; k < kN; ++k)
    if (i0 + k < n) h[k] = src[i0 + k];
  return w;
}

template <typename T>
__device__ __forceinline__ void add_payload(float (&acc)[8 / sizeof(T)], const uint2& w) {
  add_words<T, 2>(acc, reinterpret_cast<const uint32_t*>(&w));
}

// The LL protocol (see the top of the file): thread t of CTA b handles lines t, t + kThreads, ... of slice b.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    p2p_ll_kernel(const T* x, T* out, int64_t n, P2pPeers p, int rank, bool x_aligned8, bool out_aligned8) {
  pdl_enter();
  constexpr int kN = int(8 / sizeof(T));  // elements per line
  const int b = blockIdx.x;
  const int ranks = p.ranks;
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = p.ll_epoch[b] + 1;
  __syncthreads();  // every thread reads the epoch before thread 0 may store the new one
  const uint32_t e = s_epoch;
  const int parity = int(e & 1u);
  const int64_t slice = int64_t(b) * (kP2pLlSliceBytes / int64_t(sizeof(T)));
  auto area = [&](int dst, int src) {
    return p.ll_staging[dst] + ((int64_t(parity) * ranks + src) * p.ll_max_blocks + b) * kLlCtaBytes;
  };

  // 1. Every line of the slice to every peer, zeros past n (see the top of the file for why all of them).
  uint2 mine[kLlLinesPerThread];
#pragma unroll
  for (int j = 0; j < kLlLinesPerThread; ++j) {
    const int line = j * kThreads + threadIdx.x;
    mine[j] = load_payload(x, slice + int64_t(line) * kN, n, x_aligned8);
    const uint4 v = make_uint4(mine[j].x, e, mine[j].y, e);
    for (int q = 0; q < ranks; ++q)
      if (q != rank) st_volatile_v4(area(q, rank) + int64_t(line) * kLlLineBytes, v);
  }

  // 2. Each source's lines (those in range) once both epoch words read e, summed in rank order.
  const uint64_t t0 = p.timeout_ns ? globaltimer_ns() : 0;
#pragma unroll
  for (int j = 0; j < kLlLinesPerThread; ++j) {
    const int line = j * kThreads + threadIdx.x;
    const int64_t i0 = slice + int64_t(line) * kN;
    if (i0 >= n) continue;
    float acc[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) acc[k] = 0.f;
    for (int src = 0; src < ranks; ++src) {
      uint2 w = mine[j];
      if (src != rank) {
        const unsigned char* at = area(rank, src) + int64_t(line) * kLlLineBytes;
        uint4 v = ld_volatile_v4(at);
        uint32_t spins = 0;
        while (v.y != e || v.w != e) {
          if (p.timeout_ns && (++spins & 1023u) == 0 && globaltimer_ns() - t0 > p.timeout_ns) {
            printf("p2p all-reduce (LL): rank %d CTA %d line %d timed out waiting for rank %d (epoch %u, read %u %u)\n",
                   rank, b, line, src, e, v.y, v.w);
            __trap();
          }
          v = ld_volatile_v4(at);
        }
        w = make_uint2(v.x, v.z);
      }
      add_payload<T>(acc, w);
    }
    if constexpr (sizeof(T) == 2) {
      const bf162 o0 = __floats2bfloat162_rn(acc[0], acc[1]), o1 = __floats2bfloat162_rn(acc[2], acc[3]);
      uint2 o;
      o.x = *reinterpret_cast<const uint32_t*>(&o0);
      o.y = *reinterpret_cast<const uint32_t*>(&o1);
      if (out_aligned8 && i0 + kN <= n) {
        *reinterpret_cast<uint2*>(out + i0) = o;
      } else {
        const Bits<T>* h = reinterpret_cast<const Bits<T>*>(&o);
#pragma unroll
        for (int k = 0; k < kN; ++k)
          if (i0 + k < n) reinterpret_cast<Bits<T>*>(out)[i0 + k] = h[k];
      }
    } else {
      out[i0] = acc[0];
      if (i0 + 1 < n) out[i0 + 1] = acc[1];
    }
  }
  if (threadIdx.x == 0) p.ll_epoch[b] = e;
}

}  // namespace

P2pRankBuffers p2p_alloc_rank_buffers(int device, int ranks, int64_t capacity) {
  SPEAR_CHECK(ranks >= 2 && ranks <= kP2pMaxRanks, "p2p all-reduce: {} ranks (supported: 2..{})", ranks, kP2pMaxRanks);
  SPEAR_CHECK(capacity >= 1, "p2p all-reduce: capacity {} must be at least 1 element", capacity);
  P2pRankBuffers b;
  b.device = device;
  b.ranks = ranks;
  b.capacity = int64_t(align_up(size_t(capacity), size_t(kP2pBlockElems)));
  b.max_blocks = int(b.capacity / kP2pBlockElems);
  const size_t staging_bytes = align_up(size_t(2) * ranks * size_t(b.capacity) * sizeof(bf16), 256);
  const size_t flags_bytes = align_up(size_t(2) * ranks * size_t(b.max_blocks) * sizeof(uint32_t), 256);
  const size_t epoch_bytes = align_up(size_t(b.max_blocks) * sizeof(uint32_t), 256);
  const size_t ll_staging_bytes = size_t(2) * ranks * kP2pLlMaxBlocks * size_t(kLlCtaBytes);
  const size_t ll_epoch_bytes = align_up(size_t(kP2pLlMaxBlocks) * sizeof(uint32_t), 256);
  b.bytes = staging_bytes + flags_bytes + epoch_bytes + ll_staging_bytes + ll_epoch_bytes;
  DeviceScope scope(device);
  // Load the kernels on this device now. With lazy loading (CUDA's default) a kernel's first launch loads it, which
  // may synchronize the context: a first launch that waits for a kernel spinning until that very launch runs would
  // deadlock (CUDA's lazy-loading guide names this case; seen under compute-sanitizer with two GPUs).
  cudaFuncAttributes attr;
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, p2p_allreduce_kernel<bf16>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, p2p_allreduce_kernel<float>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, p2p_ll_kernel<bf16>));
  SPEAR_CUDA_CHECK(cudaFuncGetAttributes(&attr, p2p_ll_kernel<float>));
  SPEAR_CUDA_CHECK(cudaMalloc(&b.base, b.bytes));
  // Synchronous, and complete before any stream (blocking or not) can launch the kernel on these buffers.
  SPEAR_CUDA_CHECK(cudaMemset(b.base, 0, b.bytes));
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  char* base = static_cast<char*>(b.base);
  b.staging = reinterpret_cast<bf16*>(base);
  b.flags = reinterpret_cast<uint32_t*>(base + staging_bytes);
  b.epoch = reinterpret_cast<uint32_t*>(base + staging_bytes + flags_bytes);
  b.ll_staging = reinterpret_cast<unsigned char*>(base + staging_bytes + flags_bytes + epoch_bytes);
  b.ll_epoch = reinterpret_cast<uint32_t*>(b.ll_staging + ll_staging_bytes);
  return b;
}

void p2p_free_rank_buffers(P2pRankBuffers& b) {
  if (b.base) {
    DeviceScope scope(b.device);
    SPEAR_CUDA_CHECK(cudaFree(b.base));
  }
  b = P2pRankBuffers{};
}

P2pPeers p2p_peers_in_process(const std::vector<P2pRankBuffers>& all, int rank) {
  const int ranks = int(all.size());
  SPEAR_CHECK(ranks >= 2 && ranks <= kP2pMaxRanks, "p2p all-reduce: {} ranks (supported: 2..{})", ranks, kP2pMaxRanks);
  SPEAR_CHECK(rank >= 0 && rank < ranks, "p2p all-reduce: rank {} out of [0, {})", rank, ranks);
  P2pPeers p;
  p.ranks = ranks;
  p.capacity = all[0].capacity;
  p.max_blocks = all[0].max_blocks;
  for (int q = 0; q < ranks; ++q) {
    const P2pRankBuffers& b = all[size_t(q)];
    SPEAR_CHECK(b.base && b.ranks == ranks && b.capacity == p.capacity && b.max_blocks == p.max_blocks,
                "p2p all-reduce: rank {}'s buffers ({} ranks, capacity {}) do not match rank 0's ({} ranks, "
                "capacity {}) or were not allocated",
                q, b.ranks, b.capacity, all[0].ranks, p.capacity);
    p.staging[q] = b.staging;
    p.flags[q] = b.flags;
    p.ll_staging[q] = b.ll_staging;
  }
  p.epoch = all[size_t(rank)].epoch;
  p.ll_epoch = all[size_t(rank)].ll_epoch;
  p.ll_max_blocks = kP2pLlMaxBlocks;
  return p;
}

bool p2p_can_access_peers(const std::vector<int>& devices) {
  for (int a : devices)
    for (int b : devices) {
      if (a == b) continue;
      int ok = 0;
      SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, a, b));
      if (!ok) return false;
    }
  return true;
}

void p2p_enable_peer_access_from(int device, int peer) {
  if (device == peer) return;
  DeviceScope scope(device);
  const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaSuccess) return;
  // The failed call also left its error as the thread's last error; clear it, or the next launch check
  // (cudaGetLastError after a kernel) would report it as the kernel's.
  (void)cudaGetLastError();
  // Enabled before: by an earlier call, another backend of this process, or another thread on this device.
  if (err == cudaErrorPeerAccessAlreadyEnabled) return;
  fail("CUDA error enabling peer access from device {} to device {}: {}", device, peer, cudaGetErrorString(err));
}

bool p2p_enable_peer_access(const std::vector<int>& devices) {
  if (!p2p_can_access_peers(devices)) return false;
  for (int a : devices)
    for (int b : devices) p2p_enable_peer_access_from(a, b);
  return true;
}

int64_t p2p_max_elems(const P2pPeers& peers, size_t elem_bytes) {
  return peers.capacity * int64_t(sizeof(bf16)) / int64_t(elem_bytes);
}

bool p2p_allreduce_uses_ll(int64_t n, size_t elem_bytes, const P2pPeers& peers) {
  return peers.ll_max_blocks > 0 && peers.ll_epoch && n > 0 &&
         n * int64_t(elem_bytes) <= int64_t(peers.ll_max_blocks) * kP2pLlSliceBytes;
}

int p2p_allreduce_blocks(int64_t n, const P2pPeers& peers) {
  if (n <= 0) return 0;
  return int(std::min<int64_t>(peers.max_blocks, (n + kP2pBlockElems - 1) / kP2pBlockElems));
}

namespace {

template <typename T>
void p2p_allreduce(const T* x, T* out, int64_t n, const P2pPeers& peers, int rank, cudaStream_t stream) {
  SPEAR_CHECK(peers.ranks >= 2 && peers.ranks <= kP2pMaxRanks, "p2p all-reduce: {} ranks (supported: 2..{})",
              peers.ranks, kP2pMaxRanks);
  SPEAR_CHECK(rank >= 0 && rank < peers.ranks, "p2p all-reduce: rank {} out of [0, {})", rank, peers.ranks);
  const int64_t max_n = p2p_max_elems(peers, sizeof(T));
  SPEAR_CHECK(n >= 0 && n <= max_n, "p2p all-reduce: {} elements of {} bytes exceed the staging capacity of {}", n,
              sizeof(T), max_n);
  // The fixed slicing needs a whole slice per CTA in every staging area (p2p_alloc_rank_buffers ensures it).
  SPEAR_CHECK(peers.capacity % kP2pBlockElems == 0 && peers.max_blocks * kP2pBlockElems >= peers.capacity,
              "p2p all-reduce: capacity {} / max_blocks {} do not match slices of {} elements", peers.capacity,
              peers.max_blocks, kP2pBlockElems);
  SPEAR_CHECK(peers.epoch != nullptr, "p2p all-reduce: no epoch counters");
  for (int q = 0; q < peers.ranks; ++q)
    SPEAR_CHECK(peers.staging[q] && peers.flags[q], "p2p all-reduce: rank {}'s staging or flags missing", q);
  if (n == 0) return;  // every rank skips alike: the epochs stay in step
  SPEAR_CHECK(x && out, "p2p all-reduce: null input or output");
  const int blocks = int(std::min<int64_t>(peers.max_blocks, (n + kSliceElems<T> - 1) / kSliceElems<T>));
  if (p2p_allreduce_uses_ll(n, sizeof(T), peers)) {
    SPEAR_CHECK(peers.ll_max_blocks <= kP2pLlMaxBlocks, "p2p all-reduce: {} LL CTAs (at most {})", peers.ll_max_blocks,
                kP2pLlMaxBlocks);
    for (int q = 0; q < peers.ranks; ++q)
      SPEAR_CHECK(peers.ll_staging[q], "p2p all-reduce: rank {}'s LL staging missing", q);
    const int64_t per_cta = kP2pLlSliceBytes / int64_t(sizeof(T));
    const int blocks = int((n + per_cta - 1) / per_cta);
    auto aligned8 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; };
    launch_kernel(p2p_ll_kernel<T>, blocks, kThreads, 0, stream, x, out, n, peers, rank, aligned8(x), aligned8(out));
    SPEAR_CUDA_CHECK(cudaGetLastError());
    return;
  }
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  launch_kernel(p2p_allreduce_kernel<T>, blocks, kThreads, 0, stream, x, out, n, peers, rank, aligned(x), aligned(out));
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void p2p_allreduce_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, int64_t n, const P2pPeers& peers, int rank,
                        cudaStream_t stream) {
  p2p_allreduce(x, out, n, peers, rank, stream);
}

void p2p_allreduce_f32(const float* x, float* out, int64_t n, const P2pPeers& peers, int rank, cudaStream_t stream) {
  p2p_allreduce(x, out, n, peers, rank, stream);
}

void p2p_allreduce_reference_bf16(const uint16_t* const* xs, int ranks, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int q = 0; q < ranks; ++q) acc += bf16_to_f32(xs[q][i]);
    out[i] = f32_to_bf16(acc);
  }
}

void p2p_allreduce_reference_f32(const float* const* xs, int ranks, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int q = 0; q < ranks; ++q) acc += xs[q][i];
    out[i] = acc;
  }
}

}  // namespace spear::cuda
