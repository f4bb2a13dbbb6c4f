// P2P dual-write all-reduce: one kernel per rank, CTA b of every rank handles the same slice of the vector.
//
// CTA b of rank r at its e-th call (e = epoch[b] + 1, parity p = e & 1):
//   1. stores its slice of x into staging[p][r] of every peer q (remote 16-byte stores over NVLink) and keeps it
//      in registers as its own contribution;
//   2. __syncthreads, then one thread per peer q sets q's flags[p][r][b] = e with st.release.sys (cumulative
//      over the barrier: every thread's stores of step 1 are visible to q before the flag is);
//   3. the same thread spins with ld.acquire.sys until its own flags[p][q][b] == e, then __syncthreads;
//   4. every thread sums, for its elements, q = 0..R-1 in rank order in fp32 (its own registers for q == r,
//      its own staging[p][q] otherwise) and writes bf16 to out; thread 0 stores epoch[b] = e.
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
// stay equal as long as all ranks make the same sequence of calls.
//
// Deadlock freedom: a CTA waits only for the same CTA index on the other ranks, never for another CTA of its
// own grid; at most capacity / kP2pBlockElems CTAs of 256 threads run, which all fit on the GPU at once.
//
// Launched like the backend's other kernels (launch_kernel: programmatic dependent launch when enabled), so its
// launch latency hides behind the previous kernel of the stream. pdl_enter() is its first statement: no memory is
// touched before the previous kernel (e.g. the previous all-reduce) has completed, so "kernel i + 1 runs after
// kernel i" above still holds.
#include "backend/cuda/p2p_reduce.h"

#include <algorithm>
#include <cstdio>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
constexpr int kThreads = 256;
constexpr int kVecPerThread = int(kP2pBlockElems / (kThreads * 8));  // 16-byte vectors (8 bf16) per thread
static_assert(kVecPerThread * kThreads * 8 == kP2pBlockElems, "a CTA's slice is whole vectors of every thread");
static_assert(kP2pMaxRanks <= 32, "one thread of the first warp per peer");

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One 16-byte store (p 16-byte aligned). Spelled out because nvcc splits a plain uint4 assignment of these values
// into four 4-byte stores, which quadruples the NVLink write transactions.
__device__ __forceinline__ void st_v4(void* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// 8 elements at p, of which `valid` (>= 1) are in range; zeros past the end. 16-byte load when allowed.
__device__ __forceinline__ uint4 load8(const bf16* p, int64_t valid, bool aligned) {
  if (aligned && valid >= 8) return *reinterpret_cast<const uint4*>(p);
  uint4 v = make_uint4(0, 0, 0, 0);
  unsigned short* h = reinterpret_cast<unsigned short*>(&v);
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < valid) h[k] = s[k];
  return v;
}

// Rounds the 8 sums to bf16 (nearest even) and stores the `valid` first ones.
__device__ __forceinline__ void store8(bf16* p, const float (&acc)[8], int64_t valid, bool aligned) {
  uint4 o;
  bf162* oh = reinterpret_cast<bf162*>(&o);
#pragma unroll
  for (int j = 0; j < 4; ++j) oh[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
  if (aligned && valid >= 8) {
    st_v4(p, o);
    return;
  }
  const unsigned short* h = reinterpret_cast<const unsigned short*>(&o);
  unsigned short* d = reinterpret_cast<unsigned short*>(p);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < valid) d[k] = h[k];
}

__device__ __forceinline__ void add8(float (&acc)[8], const uint4& v) {
  const bf162* h = reinterpret_cast<const bf162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    acc[2 * j] += f.x;
    acc[2 * j + 1] += f.y;
  }
}

// Grid: one CTA per kP2pBlockElems slice of [0, n). No __restrict__: out may alias x (each thread reads its x
// elements into registers before it writes the same elements of out).
__global__ void __launch_bounds__(kThreads)
    p2p_allreduce_kernel(const bf16* x, bf16* out, int64_t n, P2pPeers p, int rank, bool x_aligned, bool out_aligned) {
  pdl_enter();
  const int b = blockIdx.x;
  const int ranks = p.ranks;
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = p.epoch[b] + 1;
  __syncthreads();
  const uint32_t e = s_epoch;
  const int parity = int(e & 1u);
  const int64_t slice = int64_t(b) * kP2pBlockElems;
  // Where source `src` of this parity lands in a rank's staging (same layout on every rank).
  const int64_t area = p.capacity;
  auto staging_off = [&](int src) { return (int64_t(parity) * ranks + src) * area; };

  // 1. Push this rank's slice to every peer; keep it in registers for the sum.
  uint4 mine[kVecPerThread];
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) {
    const int64_t i = slice + (int64_t(j) * kThreads + threadIdx.x) * 8;
    mine[j] = make_uint4(0, 0, 0, 0);
    if (i < n) {
      mine[j] = load8(x + i, n - i, x_aligned);
      for (int q = 0; q < ranks; ++q) {
        if (q == rank) continue;
        st_v4(p.staging[q] + staging_off(rank) + i, mine[j]);  // staging slices are 16-byte aligned
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
        printf("p2p_allreduce_bf16: rank %d CTA %d timed out waiting for rank %d (epoch %u, flag %u)\n", rank, b, q, e,
               ld_acquire_sys(mine_flag));
        __trap();
      }
    }
  }
  __syncthreads();  // extends the acquire to every thread of the CTA

  // 4. Sum in rank order. The peers' slices are read through L2 (.cg): they were written by other GPUs.
  const bf16* local = p.staging[rank];
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) {
    const int64_t i = slice + (int64_t(j) * kThreads + threadIdx.x) * 8;
    if (i < n) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int src = 0; src < ranks; ++src) {
        const uint4 v = src == rank ? mine[j] : __ldcg(reinterpret_cast<const uint4*>(local + staging_off(src) + i));
        add8(acc, v);
      }
      store8(out + i, acc, n - i, out_aligned);
    }
  }
  if (threadIdx.x == 0) p.epoch[b] = e;
}

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Sets the current device for the scope and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    SPEAR_CUDA_CHECK(cudaGetDevice(&prev_));
    if (device != prev_) SPEAR_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(prev_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

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
  b.bytes = staging_bytes + flags_bytes + epoch_bytes;
  DeviceScope scope(device);
  SPEAR_CUDA_CHECK(cudaMalloc(&b.base, b.bytes));
  // Synchronous, and complete before any stream (blocking or not) can launch the kernel on these buffers.
  SPEAR_CUDA_CHECK(cudaMemset(b.base, 0, b.bytes));
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  char* base = static_cast<char*>(b.base);
  b.staging = reinterpret_cast<bf16*>(base);
  b.flags = reinterpret_cast<uint32_t*>(base + staging_bytes);
  b.epoch = reinterpret_cast<uint32_t*>(base + staging_bytes + flags_bytes);
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
  }
  p.epoch = all[size_t(rank)].epoch;
  return p;
}

bool p2p_enable_peer_access(const std::vector<int>& devices) {
  for (int a : devices)
    for (int b : devices) {
      if (a == b) continue;
      int ok = 0;
      SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, a, b));
      if (!ok) return false;
    }
  int prev = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&prev));
  for (int a : devices) {
    SPEAR_CUDA_CHECK(cudaSetDevice(a));
    for (int b : devices) {
      if (a == b) continue;
      const cudaError_t err = cudaDeviceEnablePeerAccess(b, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // not sticky, but it would be reported by the next launch check
      } else if (err != cudaSuccess) {
        cudaSetDevice(prev);
        fail("CUDA error enabling peer access from device {} to device {}: {}", a, b, cudaGetErrorString(err));
      }
    }
  }
  SPEAR_CUDA_CHECK(cudaSetDevice(prev));
  return true;
}

int p2p_allreduce_blocks(int64_t n, const P2pPeers& peers) {
  if (n <= 0) return 0;
  return int(std::min<int64_t>(peers.max_blocks, (n + kP2pBlockElems - 1) / kP2pBlockElems));
}

void p2p_allreduce_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, int64_t n, const P2pPeers& peers, int rank,
                        cudaStream_t stream) {
  SPEAR_CHECK(peers.ranks >= 2 && peers.ranks <= kP2pMaxRanks, "p2p all-reduce: {} ranks (supported: 2..{})",
              peers.ranks, kP2pMaxRanks);
  SPEAR_CHECK(rank >= 0 && rank < peers.ranks, "p2p all-reduce: rank {} out of [0, {})", rank, peers.ranks);
  SPEAR_CHECK(n >= 0 && n <= peers.capacity, "p2p all-reduce: {} elements exceed the staging capacity of {}", n,
              peers.capacity);
  // The fixed slicing needs a whole slice per CTA in every staging area (p2p_alloc_rank_buffers ensures it).
  SPEAR_CHECK(peers.capacity % kP2pBlockElems == 0 && peers.max_blocks * kP2pBlockElems >= peers.capacity,
              "p2p all-reduce: capacity {} / max_blocks {} do not match slices of {} elements", peers.capacity,
              peers.max_blocks, kP2pBlockElems);
  SPEAR_CHECK(peers.epoch != nullptr, "p2p all-reduce: no epoch counters");
  for (int q = 0; q < peers.ranks; ++q)
    SPEAR_CHECK(peers.staging[q] && peers.flags[q], "p2p all-reduce: rank {}'s staging or flags missing", q);
  if (n == 0) return;  // every rank skips alike: the epochs stay in step
  SPEAR_CHECK(x && out, "p2p all-reduce: null input or output");
  const int blocks = p2p_allreduce_blocks(n, peers);
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  launch_kernel(p2p_allreduce_kernel, blocks, kThreads, 0, stream, x, out, n, peers, rank, aligned(x), aligned(out));
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void p2p_allreduce_reference_bf16(const uint16_t* const* xs, int ranks, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int q = 0; q < ranks; ++q) acc += bf16_to_f32(xs[q][i]);
    out[i] = f32_to_bf16(acc);
  }
}

}  // namespace spear::cuda
