// Pieces shared by the attention kernels (attention.cu: prefill and mixed batches, the K/V append and the entry
// points; attention_decode.cu: decode, with or without RoPE fused in): the launch arguments, the PTX wrappers, the
// K/V tile loader, the inner step (attend_keys) and the host helpers both sides use. Internal to the CUDA backend.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_check.h"

namespace spear::cuda::attn_detail {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kQRows = 64;            // prefill: query rows per CTA (16 per warp)
constexpr int kDecodeKeys = 64;       // decode: keys per tile (16 per warp)
constexpr int kDecodeRows = 16;       // decode: query heads per CTA (one mma M)
constexpr int kPagesPerDecodeTile = kDecodeKeys / kBlockTokens;
constexpr int kMinTilesPerSplit = 2;  // a decode split covers at least 128 keys
constexpr int kMaxSplits = 64;
constexpr int kDecodeCtasPerSm = 3;   // target CTAs of a decode launch: fills the GPU about once
// Arrival counters of the split merge, one per (token, KV head, head block), at the start of the workspace
// (zeroed once by its owner, left at zero by every launch); a decode batch with more groups runs unsplit.
constexpr int kMaxSplitGroups = 16384;
constexpr size_t kCounterBytes = size_t(kMaxSplitGroups) * sizeof(unsigned);
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
  const bf16* q;               // [T, n_heads * head_dim]
  const int32_t* token_seq;    // [T]
  const DevSeq* seqs;          // [n_seqs]
  int n_seqs, T;
  PagedKvLayer kv;
  int n_heads, n_kv_heads, head_dim, group, window;
  float scale_log2;            // scale * log2(e): the softmax runs on exp2
  int vec16;                   // K/V rows can be read with 16-byte cp.async (head_dim % 8 == 0, aligned pools)
  int n_splits;                // decode
  bf16* out;                   // [T, n_heads * head_dim]
  float* part_o;               // decode, n_splits > 1: [T][n_splits][n_heads][head_dim], normalised
  float* part_lse;             // [T][n_splits][n_heads], log2 domain
  unsigned* counters;          // [T][n_kv_heads * head_blocks] arrivals of the splits (kept at zero between launches)
  // Decode with RoPE and the KV append fused in (attention_decode_rope_bf16; k_new null otherwise): q and this
  // step's keys arrive unrotated. Every CTA rotates its query rows; the CTAs of a sequence's last split put its new
  // key (rotated) and value into their tile in place of the cache row, and the one of head block 0 also writes
  // them into the cache.
  const bf16* k_new;           // [T, kv_dim]
  const bf16* v_new;           // [T, kv_dim]
  const int32_t* positions;    // [T]: the rotation angle's position (as rope_kv_append_bf16)
  const float* inv_freq;       // [head_dim / 2]
};

// ---- host helpers ------------------------------------------------------------------------------------------

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

inline int padded_head_dim(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

int current_sm_count();

// attention.cu: the arguments of a launch, checked; attention_decode.cu: the decode launch (splits chosen, workspace
// laid out).
AttnArgs attn_args(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                   const PagedKvLayer& kv, const AttnShape& shape, __nv_bfloat16* out);
void run_decode(AttnArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream);

namespace {

// ---- PTX wrappers ------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a · b, m16n8k16, A row-major (16 x 16), B column-major (16 x 8), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo: the lower column of the fragment
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- tiles -------------------------------------------------------------------------------------------------

// Rows of K/V [KT][DP + 8] for keys key0 .. key0 + KT - 1 (key0 a multiple of kBlockTokens) of one KV head;
// keys outside [klo, khi] (or on an unallocated page, block id < 0) and dims >= head_dim are zeros; the row of
// key `skip` is left alone (the fused RoPE writes it). All threads of the CTA take part; with vec16 the copies are
// asynchronous (commit/wait by the caller).
template <int DP, int KT>
__device__ __forceinline__ void load_kv_tile(bf16* sK, bf16* sV, const AttnArgs& a, const int32_t* bt_row,
                                             int kv_col, int key0, int klo, int khi, int skip = -1) {
  constexpr int S = DP + 8;
  const int D = a.head_dim;
  if (a.vec16) {
    constexpr int kChunks = DP / 8;
#pragma unroll 4
    for (int c = threadIdx.x; c < KT * kChunks; c += kThreads) {
      const int r = c / kChunks, d0 = (c % kChunks) * 8;
      const int kp = key0 + r;
      if (kp == skip) continue;
      size_t off = 0;
      bool valid = kp >= klo && kp <= khi && d0 < D && kp / kBlockTokens < a.kv.max_blocks;
      if (valid) {
        const int blk = bt_row[kp / kBlockTokens];
        valid = blk >= 0;
        off = (size_t(blk) * kBlockTokens + size_t(kp % kBlockTokens)) * size_t(a.kv.kv_dim) + size_t(kv_col + d0);
      }
      const int bytes = valid ? 16 : 0;
      cp_async16(smem_u32(sK + r * S + d0), a.kv.k + (valid ? off : 0), bytes);
      cp_async16(smem_u32(sV + r * S + d0), a.kv.v + (valid ? off : 0), bytes);
    }
  } else {
    constexpr int kPairs = DP / 2;
    for (int c = threadIdx.x; c < KT * kPairs; c += kThreads) {
      const int r = c / kPairs, d0 = (c % kPairs) * 2;
      const int kp = key0 + r;
      if (kp == skip) continue;
      uint32_t kw = 0, vw = 0;
      if (kp >= klo && kp <= khi && d0 < D && kp / kBlockTokens < a.kv.max_blocks) {
        const int blk = bt_row[kp / kBlockTokens];
        if (blk >= 0) {
          const size_t off =
              (size_t(blk) * kBlockTokens + size_t(kp % kBlockTokens)) * size_t(a.kv.kv_dim) + size_t(kv_col + d0);
          kw = *reinterpret_cast<const uint32_t*>(a.kv.k + off);
          vw = *reinterpret_cast<const uint32_t*>(a.kv.v + off);
        }
      }
      *reinterpret_cast<uint32_t*>(sK + r * S + d0) = kw;
      *reinterpret_cast<uint32_t*>(sV + r * S + d0) = vw;
    }
  }
}

// One warp: its 16 query rows (sQw, [16][DP + 8]) against NT * 8 keys (sKw / sVw rows, absolute positions
// key0 ...), updating the running max m, sum l (per lane: rows lane / 4 and lane / 4 + 8; l is this lane's
// partial sum, reduced over the quad at the end) and the unnormalised output o (C fragments, DP / 8 tiles
// of 8 dims). pos_a / pos_b: the positions of the lane's two rows; with need_mask false every key is known
// to be visible to every row of the warp.
template <int DP, int NT>
__device__ __forceinline__ void attend_keys(const bf16* sQw, const bf16* sKw, const bf16* sVw, int key0, int pos_a,
                                            int pos_b, int window, float scale_log2, bool need_mask,
                                            float (&o)[DP / 8][4], float (&m)[2], float (&l)[2]) {
  static_assert(NT % 2 == 0, "keys come in pairs of 8-key tiles");
  constexpr int S = DP + 8;
  const int lane = threadIdx.x & 31;

  // S = Q · Kᵀ: A = Q rows (ldmatrix x4: rows lane & 15, column half lane >> 4); B = K rows as columns
  // (x4: keys (lane >> 4) * 8 + (lane & 7), dim half (lane >> 3) & 1) -> two 8-key tiles per load.
  float s[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t qa[4];
    ldsm_x4(qa, smem_u32(sQw + (lane & 15) * S + kk * 16 + (lane >> 4) * 8));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t kb[4];
      ldsm_x4(kb, smem_u32(sKw + (np * 16 + ((lane >> 4) << 3) + (lane & 7)) * S + kk * 16 + ((lane >> 3) & 1) * 8));
      mma_bf16(s[2 * np], qa, kb[0], kb[1]);
      mma_bf16(s[2 * np + 1], qa, kb[2], kb[3]);
    }
  }

  // Online softmax. Element j of s[nt]: row (j < 2 ? a : b), key key0 + nt * 8 + 2 * (lane & 3) + (j & 1).
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float x = s[nt][j] * scale_log2;
      if (need_mask) {
        const int kp = key0 + nt * 8 + 2 * (lane & 3) + (j & 1);
        const int pr = j < 2 ? pos_a : pos_b;
        const bool visible = kp <= pr && (window <= 0 || kp > pr - window);
        x = visible ? x : -INFINITY;
      }
      s[nt][j] = x;
      mx[j >> 1] = fmaxf(mx[j >> 1], x);
    }
  }
  float base[2], alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row that has seen no visible key yet: keep 0s, no NaN
    alpha[r] = exp2f(m[r] - base[r]);
    m[r] = mx[r];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float e = exp2f(s[nt][j] - base[j >> 1]);
      s[nt][j] = e;
      rs[j >> 1] += e;
    }
  }
  l[0] = l[0] * alpha[0] + rs[0];
  l[1] = l[1] * alpha[1] + rs[1];
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) {
    o[nd][0] *= alpha[0];
    o[nd][1] *= alpha[0];
    o[nd][2] *= alpha[1];
    o[nd][3] *= alpha[1];
  }

  // O += P · V: the C fragments of two 8-key tiles are the A fragment of a 16-key step (P in bf16);
  // B = V (ldmatrix x4 .trans: keys lane & 15, dim half lane >> 4) -> two 8-dim tiles per load.
#pragma unroll
  for (int kc = 0; kc < NT / 2; ++kc) {
    uint32_t pa[4];
    pa[0] = pack_bf16(s[2 * kc][0], s[2 * kc][1]);
    pa[1] = pack_bf16(s[2 * kc][2], s[2 * kc][3]);
    pa[2] = pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    pa[3] = pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
    for (int nd = 0; nd < DP / 16; ++nd) {
      uint32_t vb[4];
      ldsm_x4_trans(vb, smem_u32(sVw + (kc * 16 + (lane & 15)) * S + nd * 16 + (lane >> 4) * 8));
      mma_bf16(o[2 * nd], pa, vb[0], vb[1]);
      mma_bf16(o[2 * nd + 1], pa, vb[2], vb[3]);
    }
  }
}

// Query rows [n_valid of 16 or 64][DP + 8] into shared memory (bf16 pairs; zeros beyond head_dim and for
// invalid rows). row_src(r) returns the row's q pointer or nullptr.
template <int DP, int kRows, typename RowSrc>
__device__ __forceinline__ void load_q_rows(bf16* sQ, int head_dim, RowSrc row_src) {
  constexpr int S = DP + 8, kPairs = DP / 2;
  for (int c = threadIdx.x; c < kRows * kPairs; c += kThreads) {
    const int r = c / kPairs, d0 = (c % kPairs) * 2;
    const bf16* src = row_src(r);
    uint32_t w = 0;
    if (src != nullptr && d0 < head_dim) w = *reinterpret_cast<const uint32_t*>(src + d0);
    *reinterpret_cast<uint32_t*>(sQ + r * S + d0) = w;
  }
}

}  // namespace

}  // namespace spear::cuda::attn_detail
