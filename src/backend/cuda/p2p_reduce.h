#pragma once
// One-shot all-reduce (sum) of bf16 (or fp32) vectors among R ranks (2..8) whose device memory is mutually
// accessible over NVLink: the "dual-write" alternative to NCCL all-reduce for small messages (DESIGN.md §5, tensor
// parallelism). Each rank pushes its input into every peer's staging area with remote stores, raises one flag per
// peer, waits for the peers' flags and sums the R contributions locally: one flag round trip, no ring steps.
//
// Two protocols, chosen per call by size (p2p_allreduce_uses_ll):
//   - low-latency (LL), for vectors of up to kP2pLlMaxBlocks · kP2pLlSliceBytes bytes: every 16-byte store carries
//     8 payload bytes and the call's epoch twice ({data, epoch, data, epoch}); the receiver polls the lines
//     themselves, so no flag is written after the data and no system-scope release fence waits for the data to
//     land. Twice the bytes on NVLink, one NVLink latency less (the idea of NCCL's LL protocol);
//   - flags, for larger vectors: plain 16-byte stores of the data, then one released flag per CTA and peer.
// Each protocol has its own staging and epoch counters, so calls of both may follow each other in any order.
//
// The kernel sees only raw pointers (peer pointers valid on this device): buffers shared by peer access inside
// one process, or by CUDA IPC handles across processes (CudaBackend::set_process_group sets up both).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace spear::cuda {

constexpr int kP2pMaxRanks = 8;
// bf16 elements of the vector one CTA reduces. The slice of CTA b is [b, b + 1) · kP2pBlockElems whatever n is, so
// a staging region always has the same reader and writer CTA (see p2p_reduce.cu for why that matters). An fp32
// call's CTA b takes kP2pBlockElems / 2 elements: the same bytes of the staging.
constexpr int64_t kP2pBlockElems = 4096;
// LL protocol: payload bytes of one CTA's slice (in 2 · kP2pLlSliceBytes of staging lines), and CTAs at most.
constexpr int64_t kP2pLlSliceBytes = 4096;
constexpr int kP2pLlMaxBlocks = 64;

// One rank's exchange buffers, in its own device memory, one allocation (one IPC handle), zeroed:
//   staging [2 parities][ranks sources][capacity] bf16   what the peers pushed to this rank;
//   flags   [2 parities][ranks sources][max_blocks] u32  source q's slice b of epoch e has landed here;
//   epoch   [max_blocks] u32                             calls completed by each CTA of this rank;
//   ll_staging [2 parities][ranks sources][kP2pLlMaxBlocks][2 · kP2pLlSliceBytes]  the LL protocol's lines;
//   ll_epoch   [kP2pLlMaxBlocks] u32                                                its calls per CTA.
struct P2pRankBuffers {
  int device = -1;
  int ranks = 0;
  int64_t capacity = 0;  // elements per [parity][source] area: a multiple of kP2pBlockElems
  int max_blocks = 0;    // capacity / kP2pBlockElems
  void* base = nullptr;  // the allocation (staging, flags and epoch point into it)
  size_t bytes = 0;
  __nv_bfloat16* staging = nullptr;
  uint32_t* flags = nullptr;
  uint32_t* epoch = nullptr;
  unsigned char* ll_staging = nullptr;
  uint32_t* ll_epoch = nullptr;
};

// Allocates and zeroes one rank's buffers on `device` for vectors of up to `capacity` elements (rounded up to a
// multiple of kP2pBlockElems). The current device is restored. All ranks must use the same ranks and capacity.
P2pRankBuffers p2p_alloc_rank_buffers(int device, int ranks, int64_t capacity);
// Frees what p2p_alloc_rank_buffers allocated (no-op on an empty struct) and resets `b`.
void p2p_free_rank_buffers(P2pRankBuffers& b);

// What the kernel of one rank needs: every rank's staging and flags as seen from this rank's device, this rank's
// epoch counters, and the common geometry.
struct P2pPeers {
  __nv_bfloat16* staging[kP2pMaxRanks] = {};
  uint32_t* flags[kP2pMaxRanks] = {};
  uint32_t* epoch = nullptr;  // this rank's [max_blocks]
  int ranks = 0;
  int64_t capacity = 0;
  int max_blocks = 0;
  // The LL protocol's lines of every rank, this rank's LL epochs, and its CTAs at most: 0 turns LL off (every call
  // takes the flag protocol; all ranks must agree), e.g. for A/B runs.
  unsigned char* ll_staging[kP2pMaxRanks] = {};
  uint32_t* ll_epoch = nullptr;
  int ll_max_blocks = 0;
  // A CTA that waits longer than this for a peer's flag prints which peer it waits for and traps (the launch
  // fails with an error instead of hanging the process forever); 0 waits forever, as NCCL does.
  uint64_t timeout_ns = 0;
};

// The peers of `rank` when every rank's buffers live in this process and peer access is enabled between all the
// devices (unified addressing: a pointer is valid on every device that has access).
P2pPeers p2p_peers_in_process(const std::vector<P2pRankBuffers>& all, int rank);

// Whether every device of `devices` can access every other one's memory (cudaDeviceCanAccessPeer).
bool p2p_can_access_peers(const std::vector<int>& devices);
// Enables access from `device` to the memory of `peer` (one direction; a no-op when device == peer). Safe to
// repeat: access enabled before, by an earlier call or another thread or backend of the process, is fine, and
// the error CUDA reports for it is cleared so that no later error check sees it. Throws on other errors. The
// current device is restored.
void p2p_enable_peer_access_from(int device, int peer);
// Enables peer access between every pair of `devices` (both ways, p2p_enable_peer_access_from). Returns false,
// changing nothing, when some pair cannot access each other.
bool p2p_enable_peer_access(const std::vector<int>& devices);

// The longest vector of elem_bytes-sized elements one call takes: peers.capacity for bf16, half of it for fp32
// (the capacity counts bf16 elements; an fp32 call uses the same staging bytes).
int64_t p2p_max_elems(const P2pPeers& peers, size_t elem_bytes);

// Whether a call of n elements of elem_bytes takes the LL protocol (it fits peers.ll_max_blocks LL slices).
bool p2p_allreduce_uses_ll(int64_t n, size_t elem_bytes, const P2pPeers& peers);

// CTAs of one bf16 call: ceil(n / kP2pBlockElems), at most peers.max_blocks; the same on every rank for the same n.
int p2p_allreduce_blocks(int64_t n, const P2pPeers& peers);

// out = Σ_q x_q over the ranks q, summed in rank order (q = 0..R-1) in fp32 and rounded once to bf16, so every
// rank gets bit-identical results. x: [n] bf16 of this rank; out: [n] bf16 (may alias x); n <= peers.capacity.
// Every rank must make the same sequence of calls (same n, in the same order) on one stream each: the per-CTA
// epoch counters stay equal across ranks only then. Launch on the device that owns `stream` (current device).
// Safe inside CUDA graph capture (no host-side state changes per call). x and out may have any alignment
// (16-byte aligned ones use vector accesses).
void p2p_allreduce_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, int64_t n, const P2pPeers& peers, int rank,
                        cudaStream_t stream);
// The same for fp32 vectors of n <= p2p_max_elems(peers, 4) elements: fp32 sums in rank order, not rounded. CTA b
// of an fp32 call covers the same staging bytes, flags and epoch as CTA b of a bf16 call, so bf16 and fp32 calls
// may follow each other in any order (as long as every rank makes the same sequence of calls).
void p2p_allreduce_f32(const float* x, float* out, int64_t n, const P2pPeers& peers, int rank, cudaStream_t stream);

// CPU reference: out[i] = bf16(Σ_{q = 0..ranks-1} float(xs[q][i])), fp32 sum in rank order, round to nearest even.
// xs: `ranks` host arrays of n bf16 bit patterns.
void p2p_allreduce_reference_bf16(const uint16_t* const* xs, int ranks, int64_t n, uint16_t* out);
// CPU reference of p2p_allreduce_f32: out[i] = Σ_{q = 0..ranks-1} xs[q][i] in fp32, in rank order.
void p2p_allreduce_reference_f32(const float* const* xs, int ranks, int64_t n, float* out);

}  // namespace spear::cuda
