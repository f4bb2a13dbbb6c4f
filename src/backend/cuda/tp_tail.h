#pragma once
// The fused post-EC tail of a row-parallel linear under tensor parallelism (DESIGN.md §5): after every rank's
// row-parallel GEMM produced its partial output y_q [T, H], one kernel per rank
//   1. computes the partial EC projection z_q = A_q · xs (A_q: this rank's columns of A, xs: its GEMM input);
//   2. pushes y_q and z_q into every peer's staging (remote stores over NVLink) as LL lines (below);
//   3. reads every rank's lines of its row as they land;
//   4. y = Σ_q y_q, z = Σ_q z_q, summed in rank order in fp32 (bit-identical results on every rank);
//   5. g = 1 + tanh(W2·silu(W1·z + b1) + b2) (g = 1 for a static EC), y += B·(g ⊙ z);
//   6. x += bf16(y) (the residual, as add_rms_norm_bf16) and h = RMSNorm(x) · w.
// It replaces linear_ec_partial's ec_project + all_reduce_sum (y, z) + ec_expand + add_rms_norm: one launch and
// one exchange instead of a projection GEMM, two reductions and three element-wise kernels.
//
// The exchange is p2p_reduce.cu's LL protocol (per-CTA epochs in device memory, two staging parities, 16-byte lines
// of 8 payload bytes and the epoch twice, polled by the reader: no flag, no fence); see tp_tail.cu for the argument
// as it applies here.
// One CTA per token row t, and CTA t always owns row t's staging slots on every rank, whatever T is.
//
// Numerics. y is staged as bf16: the partials arrive as bf16, so an fp32 copy would carry the same values at twice
// the NVLink bytes. z is staged as fp32 (computed in fp32 here, never rounded). A_q is the bf16 copy (CudaEc::A16,
// the matrix ec_project multiplies by), B, W1, b1, W2, b2 are fp32. With one rank and no EC the kernel is bit-
// identical to add_rms_norm_bf16(x, y_q, w, h).
//
// Cost, measured on one H200 (one rank, H = 4096, CUDA graph of back-to-back calls, T = 1 / 64): no EC 3.2 / 3.4 µs
// (add_rms_norm_bf16: 1.9 / 2.0); static EC r = 64 with z given 15 / 16 µs; gated (w = 16) 16.4 / 17.5; z = A·xs in
// the kernel from k_q = 2048 adds 5 µs. An EC's cost is one SM reading all of B from L2 per row: one CTA per row
// bounds it by one SM's L2 bandwidth, so T = 1 is as slow as T = 64. So the kernel reads the bf16 copy B16 where it
// can (half the bytes of fp32 B, and r / 8 lanes per row instead of a layout made for r = 64, which left 12 of 16
// lanes idle at r = 16); spreading a row over a cluster of CTAs (the sum of squares through distributed shared
// memory) would divide it further.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/w4a16_gemm.h"

namespace spear::cuda {

constexpr int kTpTailMaxRanks = 8;
constexpr int kTpTailMaxRows = 64;  // decode rows per call (one CTA each, all co-resident)
constexpr int kTpTailMaxRank = 64;  // EC rank r
constexpr int kTpTailMaxGate = 64;  // EC gate width
constexpr int kTpTailMaxH = 16384;  // hidden size (one CTA of 256 threads normalizes a row)

// One rank's exchange buffers, in its own device memory, one allocation (one IPC handle), zeroed:
//   staging [2 parities][ranks sources][max_rows][slot_bytes]  slot: ceil(max_h / 4) lines of y (4 bf16 each),
//                                                               then ceil(max_rank / 2) lines of z (2 fp32 each);
//   epoch   [max_rows] u32                                      calls completed by each row CTA of this rank.
struct TpTailRankBuffers {
  int device = -1;
  int ranks = 0;
  int max_rows = 0, max_h = 0, max_rank = 0;
  int64_t slot_bytes = 0;  // bytes of one [parity][source][row] slot, a multiple of 16
  int64_t z_offset = 0;    // byte offset of z's lines inside a slot
  void* base = nullptr;    // the allocation (staging and epoch point into it)
  size_t bytes = 0;
  unsigned char* staging = nullptr;
  uint32_t* epoch = nullptr;
};

// Allocates and zeroes one rank's buffers on `device` for calls of up to max_rows rows of max_h elements and EC
// ranks up to max_rank (0: no EC). ranks: 2..kTpTailMaxRanks. The current device is restored. All ranks must use
// the same ranks, max_rows, max_h and max_rank. Bytes: 2 · ranks · max_rows · (4 · max_h + 8 · max_rank), e.g.
// 67.6 MB for 8 ranks, 64 rows, H = 16384, r = 64 (16.9 MB for 2 ranks).
TpTailRankBuffers tp_tail_alloc_rank_buffers(int device, int ranks, int max_h, int max_rank,
                                             int max_rows = kTpTailMaxRows);
// Frees what tp_tail_alloc_rank_buffers allocated (no-op on an empty struct) and resets `b`.
void tp_tail_free_rank_buffers(TpTailRankBuffers& b);

// What the kernel of one rank needs: every rank's staging as seen from this rank's device (in-process
// peer pointers or IPC mappings of each rank's `base`, plus the same offsets), this rank's epoch counters and the
// common geometry. ranks == 1 is the single-GPU case: no exchange, the pointers may be null.
struct TpTailPeers {
  unsigned char* staging[kTpTailMaxRanks] = {};
  uint32_t* epoch = nullptr;  // this rank's [max_rows]
  int ranks = 1;
  int max_rows = kTpTailMaxRows, max_h = kTpTailMaxH, max_rank = kTpTailMaxRank;
  int64_t slot_bytes = 0, z_offset = 0;
  // A CTA that waits longer than this for a peer's line prints which peer it waits for and traps (the launch fails
  // instead of hanging the process); 0 waits forever.
  uint64_t timeout_ns = 0;
};

// This rank's geometry and epochs from its own buffers (what every rank's TpTailPeers shares); the staging
// pointers of the ranks are left for the caller to map.
TpTailPeers tp_tail_peers_of(const TpTailRankBuffers& mine);

// The peers of `rank` when every rank's buffers live in this process, on devices with peer access enabled between
// them (or all on one device: tests simulate R ranks on one GPU that way).
TpTailPeers tp_tail_peers_in_process(const std::vector<TpTailRankBuffers>& all, int rank);

// Where `rank`'s row-parallel W4 GEMM stores its rows for the dual-write (w4a16_gemm_mirrored): the peers'
// staging and this rank's epochs.
W4PeerMirror tp_tail_mirror(const TpTailPeers& peers, int rank);

// One module's compensator as this rank holds it (CudaEc of the rank's shard). rank == 0: no EC.
struct TpTailEc {
  int rank = 0, gate_width = 0;
  int in = 0;                        // k_q: this rank's GEMM input width (its columns of A)
  const __nv_bfloat16* A = nullptr;  // [rank][in] bf16 (CudaEc::A16 of the shard)
  const float* B = nullptr;          // [H][rank] fp32 (CudaEc::B: the whole B, replicated on every rank)
  // [H][rank] bf16 (CudaEc::B16, B rounded as the fused decode launch reads it): read instead of B where
  // rank % 8 == 0 and it is 16-byte aligned (half the bytes of B; B may then be null).
  const __nv_bfloat16* B16 = nullptr;
  const float* W1 = nullptr;         // [gate_width][rank] fp32 (null when static)
  const float* b1 = nullptr;         // [gate_width]
  const float* W2 = nullptr;         // [rank][gate_width]
  const float* b2 = nullptr;         // [rank]
  // [T][rank] fp32: this rank's partial z = A_q · xs, precomputed (by linear_ec_partial's ec_project, or a GEMM
  // epilogue); A, in and xs are then unused. Null: the kernel computes it, each row's CTA reading all of A
  // (rank · in bf16) from L2, which for wide k_q and many rows costs more than one GEMM for all rows.
  const float* z = nullptr;
};

// The tail of one row-parallel linear, on this rank (see the top of the file):
//   y_part [T, H] bf16: this rank's GEMM output (bias, if any, included by one rank only);
//   xs     [T, ec.in] bf16: this rank's GEMM input (read only with an EC and no ec->z; may be null otherwise);
//   ec: the compensator or null (no EC; every rank must agree);
//   x      [T, H] bf16: the residual stream, updated in place (the same values on every rank before and after);
//   norm_w [H] bf16, h [T, H] bf16 out: the next RMSNorm (h must not alias x, y_part or xs).
// T <= peers.max_rows, H <= peers.max_h, ec->rank <= peers.max_rank. Every rank must make the same sequence of
// calls (same T, in the same order) on one stream each: the per-row epochs stay equal across ranks only then; and
// every call on one set of buffers must have the same H (a model's hidden size): a row's lines of y are written
// only up to H, so lines beyond an earlier call's H could be stale (z's lines are all written on every call).
// Launch on the device that owns `stream` (current device). Safe inside CUDA graph capture. h is bit-identical on
// every rank when every rank takes the same path: H % 8 == 0 and x, y_part, norm_w, h 16-byte aligned on all
// ranks or on none (the two paths sum the squares in different orders); x is bit-identical regardless.
// y_mirrored: this rank's GEMM already stored y_part's rows into every peer's staging (w4a16_gemm_mirrored, the
// P2P dual-write from its epilogue) in this call's epoch, so the kernel does not push them (it still pushes z).
// Ranks may differ in it from call to call.
void tp_tail_bf16(const __nv_bfloat16* y_part, const __nv_bfloat16* xs, const TpTailEc* ec, __nv_bfloat16* x,
                  const __nv_bfloat16* norm_w, __nv_bfloat16* h, int T, int H, float eps, const TpTailPeers& peers,
                  int rank, cudaStream_t stream, bool y_mirrored = false);

// The EC for the CPU reference: every source rank's A columns, the shared B and gate.
struct TpTailEcHost {
  int rank = 0, gate_width = 0;
  std::vector<int> in;          // k_q of each source rank
  std::vector<const float*> A;  // [rank][in[q]] of each source rank; rounded to bf16 here (as the device's A16)
  const float* B = nullptr;     // [H][rank]
  const float* W1 = nullptr;    // [gate_width][rank] (gate_width == 0: static, g = 1)
  const float* b1 = nullptr;
  const float* W2 = nullptr;
  const float* b2 = nullptr;
};

// CPU reference of tp_tail_bf16 over all ranks at once, in double (z, gate, y = Σ_q y_q + B·(g ⊙ z)), then the
// device's bf16 steps: x = bf16(float(x) + float(bf16(y))), h = bf16(w · x / sqrt(mean(x²) + eps)).
// y_parts[q]: [T, H], xs_parts[q]: [T, ec->in[q]] bf16 bits of source rank q; ec null: no EC; x updated in place.
void tp_tail_reference(int ranks, int T, int H, const uint16_t* const* y_parts, const uint16_t* const* xs_parts,
                       const TpTailEcHost* ec, uint16_t* x, const uint16_t* norm_w, uint16_t* h, float eps);

}  // namespace spear::cuda
