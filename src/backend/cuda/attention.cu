// Paged-KV causal GQA attention on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), FA2-style
// online softmax in fp32 (exp2 domain). Two kernels share one inner step (attend_keys):
//
//  * prefill / mixed: a CTA takes 64 query rows of one sequence and one KV head, a row being a (token, query
//    head of the group) pair, so the keys and values of a KV head are read once for all its query heads.
//    K/V tiles of KT keys (whole 16-token pages) stream through shared memory with cp.async, double-buffered;
//    each of the 4 warps owns 16 rows and all KT keys of a tile.
//  * decode (one new token per sequence): a CTA takes one token, one KV head (up to 16 query heads, padded to
//    the 16 rows of an mma) and one split of the context; each of the 4 warps owns 16 keys of every 64-key
//    tile, the warps merge in shared memory. With several splits (flash-decoding) each split writes its
//    normalised partial output and log-sum-exp to the workspace and counts itself in; the last split of a
//    (token, head block) to arrive merges them in split order (no second kernel: one launch less per layer,
//    and the result does not depend on the arrival order). The
//    launch depends only on T, the shape, kv.max_blocks and the workspace size, never on context lengths
//    (read from seqs on the device), so a captured decode step replays while contexts grow; a sequence's
//    context is divided evenly over the splits (at least kMinTilesPerSplit tiles each) and the CTAs of the
//    splits it does not need exit at once.
//
// Shared-memory rows are padded by 8 bf16 (16 bytes) so that ldmatrix's eight 16-byte row reads of a phase hit
// distinct banks for every head dim that is a multiple of 8. Keys outside the valid range of a CTA are
// zero-filled (never read from stale or unallocated pages: 0 * NaN would poison the output) and masked.
// Head dims: 64 and 128 run on kernels sized for them; other even head dims up to 256 run zero-padded on the
// next size (64, 128 or 256); head dims that are not a multiple of 8 load K/V with 4-byte accesses.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope_rotate.cuh"

namespace spear::cuda {

namespace {

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

// Fused RoPE. A decode CTA's thread owns one pair slot j = threadIdx.x % (DP / 2) of every row it writes (kThreads
// is a multiple of DP / 2): slot j < half rotates dims (j, j + half) with the thread's own cos c / sin s; the slots
// after it zero the padding dims [head_dim, DP) two at a time.
template <int DP>
constexpr bool kRopeSlotsFit = kThreads % (DP / 2) == 0;

// The kDecodeRows query rows rotated as rope_bf16 would, zeros for invalid rows (row_src(r) null).
template <int DP, typename RowSrc>
__device__ __forceinline__ void load_q_rows_rope(bf16* sQ, int head_dim, float c, float s, RowSrc row_src) {
  static_assert(kRopeSlotsFit<DP>, "one pair slot per thread");
  constexpr int S = DP + 8, kSlots = DP / 2;
  const int half = head_dim / 2, j = threadIdx.x % kSlots;
  for (int r = threadIdx.x / kSlots; r < kDecodeRows; r += kThreads / kSlots) {
    bf16* row = sQ + r * S;
    const bf16* src = row_src(r);
    if (j < half) {
      bf16 lo = __float2bfloat16_rn(0.f), hi = lo;
      if (src != nullptr) rope_rotate(__bfloat162float(src[j]), __bfloat162float(src[j + half]), c, s, lo, hi);
      row[j] = lo;
      row[j + half] = hi;
    } else {
      row[head_dim + 2 * (j - half)] = row[head_dim + 2 * (j - half) + 1] = __float2bfloat16_rn(0.f);
    }
  }
}

// The new token's key (rotated) and value into the tile rows rk / rv (zeros beyond head_dim; all zeros when its page
// is not allocated, blk < 0, as the tile loader would give), and into the cache rows ck / cv when given (one CTA per
// token and KV head writes them). Threads [0, DP / 2) take the key's pair slots (c, s: their own angle), the next
// DP / 2 threads (the same ones where DP / 2 = kThreads) the value's dims in twos.
template <int DP>
__device__ __forceinline__ void put_new_kv_row(const AttnArgs& a, int t, int kv_col, int blk, float c, float s,
                                               bf16* rk, bf16* rv, bf16* ck, bf16* cv) {
  constexpr int kSlots = DP / 2;
  const int D = a.head_dim, half = D / 2, tid = threadIdx.x;
  const bf16 zero = __float2bfloat16_rn(0.f);
  const bool ok = blk >= 0;
  if (tid < kSlots) {
    const int j = tid;
    if (j < half) {
      const bf16* kn = a.k_new + size_t(t) * a.kv.kv_dim + kv_col;
      bf16 lo = zero, hi = zero;
      if (ok) rope_rotate(__bfloat162float(kn[j]), __bfloat162float(kn[j + half]), c, s, lo, hi);
      rk[j] = lo;
      rk[j + half] = hi;
      if (ck && ok) ck[j] = lo, ck[j + half] = hi;
    } else {
      rk[D + 2 * (j - half)] = rk[D + 2 * (j - half) + 1] = zero;
    }
  }
  const int vj = 2 * kSlots <= kThreads ? tid - kSlots : tid;
  if (vj >= 0 && vj < kSlots) {
    const bf16* vn = a.v_new + size_t(t) * a.kv.kv_dim + kv_col;
    for (int d = 2 * vj; d < 2 * vj + 2; ++d) {
      const bf16 x = d < D && ok ? vn[d] : zero;
      rv[d] = x;
      if (cv && d < D && ok) cv[d] = x;
    }
  }
}

// ---- decode ------------------------------------------------------------------------------------------------

struct DecodePlan {
  int lo;               // first visible key
  int first_page;       // tiles are counted from this page
  int n_tiles;          // 64-key tiles covering [lo, p]
  int tiles_per_split;
  int n_active;         // splits with work (<= n_splits)
};

// How a sequence whose new token is at position p divides its context over n_splits CTAs; the decode and the
// combine kernels both derive it from p, so nothing but seqs has to pass between them.
__device__ __forceinline__ DecodePlan decode_plan(int p, int window, int n_splits) {
  DecodePlan d;
  d.lo = window > 0 ? max(0, p - window + 1) : 0;
  d.first_page = d.lo / kBlockTokens;
  const int n_pages = p / kBlockTokens - d.first_page + 1;
  d.n_tiles = (n_pages + kPagesPerDecodeTile - 1) / kPagesPerDecodeTile;
  d.tiles_per_split = max((d.n_tiles + n_splits - 1) / n_splits, kMinTilesPerSplit);
  d.n_active = (d.n_tiles + d.tiles_per_split - 1) / d.tiles_per_split;
  return d;
}

__device__ void combine_splits(const AttnArgs& a, int t, int h, int na, int lane);

template <int DP>
__host__ __device__ constexpr size_t decode_smem_bytes() {
  return size_t(kDecodeRows + 4 * kDecodeKeys) * (DP + 8) * sizeof(bf16);  // Q + 2 stages of K and V
}

// grid (n_splits, n_kv_heads * head_blocks, T); head_blocks = ceil(group / 16).
template <int DP>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const AttnArgs a) {
  pdl_enter();
  constexpr int S = DP + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [16][S]
  bf16* sK = sQ + kDecodeRows * S;                // [2][64][S]
  bf16* sV = sK + 2 * kDecodeKeys * S;            // [2][64][S]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.z;
  const int head_blocks = (a.group + kDecodeRows - 1) / kDecodeRows;
  const int kvh = blockIdx.y / head_blocks, hb = blockIdx.y % head_blocks;
  const int split = blockIdx.x;
  const DevSeq sq = a.seqs[a.token_seq[t]];
  const int p = sq.pos0 + (t - sq.token_begin);
  const DecodePlan plan = decode_plan(p, a.window, a.n_splits);
  if (split >= plan.n_active) return;  // uniform over the CTA
  const int tile_begin = split * plan.tiles_per_split;
  const int tile_end = min(plan.n_tiles, tile_begin + plan.tiles_per_split);
  const int lo = plan.lo, hi = p;
  const int D = a.head_dim, q_dim = a.n_heads * D;
  const int head0 = kvh * a.group + hb * kDecodeRows;
  const int n_rows = min(kDecodeRows, a.group - hb * kDecodeRows);
  const int32_t* bt_row = a.kv.block_table + size_t(sq.kv_slot) * size_t(a.kv.max_blocks);
  const int kv_col = kvh * D;

  auto q_row = [&](int r) -> const bf16* {
    return r < n_rows ? a.q + size_t(t) * q_dim + size_t(head0 + r) * D : nullptr;
  };
  // Fused RoPE: the last split takes the new key's row (p's page, when within the block table) from k_new / v_new
  // instead of from the cache; its tile loads skip that row and it is written at the tile's issue, so nothing of it
  // sits on the path between a tile's arrival and its use.
  const bool rope = a.k_new != nullptr;
  float rc = 0.f, rs = 0.f;  // this thread's pair slot's cos / sin
  int new_key = -1;
  if (rope) {
    const int j = threadIdx.x % (DP / 2);
    if (j < D / 2) rope_angle(float(a.positions[t]), a.inv_freq[j], rc, rs);
    if (split == plan.n_active - 1 && p >= 0 && p / kBlockTokens < a.kv.max_blocks) new_key = p;
  }
  const int key_base = plan.first_page * kBlockTokens;
  auto put_new_row = [&](int tile, int buf) {  // after issuing the loads of tile into buffer buf
    const int key0 = key_base + tile * kDecodeKeys;
    if (new_key < key0 || new_key >= key0 + kDecodeKeys) return;
    const int blk = bt_row[p / kBlockTokens];
    bf16 *ck = nullptr, *cv = nullptr;
    if (hb == 0 && blk >= 0) {
      const size_t row = (size_t(blk) * kBlockTokens + size_t(p % kBlockTokens)) * size_t(a.kv.kv_dim) + kv_col;
      ck = a.kv.k + row;
      cv = a.kv.v + row;
    }
    const int off = buf * kDecodeKeys * S + (new_key - key0) * S;
    put_new_kv_row<DP>(a, t, kv_col, blk, rc, rs, sK + off, sV + off, ck, cv);
  };

  if (!rope) {
    load_q_rows<DP, kDecodeRows>(sQ, D, q_row);
  }
  float o[DP / 8][4];
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  load_kv_tile<DP, kDecodeKeys>(sK, sV, a, bt_row, kv_col, key_base + tile_begin * kDecodeKeys, lo, hi, new_key);
  cp_async_commit();
  if (rope) {
    load_q_rows_rope<DP>(sQ, D, rc, rs, q_row);
    put_new_row(tile_begin, 0);
  }
  for (int it = tile_begin; it < tile_end; ++it) {
    const int buf = (it - tile_begin) & 1;
    if (it + 1 < tile_end) {
      load_kv_tile<DP, kDecodeKeys>(sK + (buf ^ 1) * kDecodeKeys * S, sV + (buf ^ 1) * kDecodeKeys * S, a, bt_row,
                                    kv_col, key_base + (it + 1) * kDecodeKeys, lo, hi, new_key);
      if (rope) put_new_row(it + 1, buf ^ 1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile it has landed (only the prefetch of it + 1 may be in flight)
    __syncthreads();
    const int key0 = key_base + it * kDecodeKeys + warp * 16;
    if (key0 <= hi && key0 + 15 >= lo) {
      const bool need_mask = !(key0 + 15 <= hi && key0 >= lo);
      const int off = buf * kDecodeKeys * S + warp * 16 * S;
      attend_keys<DP, 2>(sQ, sK + off, sV + off, key0, p, p, a.window, a.scale_log2, need_mask, o, m, l);
    }
    __syncthreads();  // everyone is done with buf before the next iteration's prefetch overwrites it
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the 4 warps (each saw a different quarter of every tile) through shared memory, reusing the tiles.
  float* sO = reinterpret_cast<float*>(smem_raw);  // [4][16][DP]
  float* sML = sO + kWarps * kDecodeRows * DP;     // [4][16] x (m, l)
  static_assert(size_t(kWarps * kDecodeRows * DP + kWarps * kDecodeRows * 2) * sizeof(float) <=
                    decode_smem_bytes<DP>(),
                "the merge buffer fits in the tiles' shared memory");
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int row = lane >> 2;
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) {
    const int d = nd * 8 + 2 * (lane & 3);
    float* o_a = sO + (warp * kDecodeRows + row) * DP + d;
    float* o_b = o_a + 8 * DP;
    o_a[0] = o[nd][0];
    o_a[1] = o[nd][1];
    o_b[0] = o[nd][2];
    o_b[1] = o[nd][3];
  }
  if ((lane & 3) == 0) {
    sML[(warp * kDecodeRows + row) * 2] = m[0];
    sML[(warp * kDecodeRows + row) * 2 + 1] = l[0];
    sML[(warp * kDecodeRows + row + 8) * 2] = m[1];
    sML[(warp * kDecodeRows + row + 8) * 2 + 1] = l[1];
  }
  __syncthreads();

  const bool single = plan.n_active == 1;
  for (int e = threadIdx.x; e < kDecodeRows * (DP / 2); e += kThreads) {
    const int r = e / (DP / 2), d = (e % (DP / 2)) * 2;
    if (r >= n_rows || d >= D) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sML[(w * kDecodeRows + r) * 2]);
    float L = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sML[(w * kDecodeRows + r) * 2];
      const float c = mw == -INFINITY ? 0.f : exp2f(mw - M);  // a warp that saw no visible key weighs 0
      L += c * sML[(w * kDecodeRows + r) * 2 + 1];
      o0 += c * sO[(w * kDecodeRows + r) * DP + d];
      o1 += c * sO[(w * kDecodeRows + r) * DP + d + 1];
    }
    const float inv = 1.f / L;
    const int head = head0 + r;
    if (single) {
      *reinterpret_cast<__nv_bfloat162*>(a.out + size_t(t) * q_dim + size_t(head) * D + d) =
          __floats2bfloat162_rn(o0 * inv, o1 * inv);
    } else {
      const size_t prow = (size_t(t) * a.n_splits + split) * a.n_heads + head;
      *reinterpret_cast<float2*>(a.part_o + prow * D + d) = make_float2(o0 * inv, o1 * inv);
      if (d == 0) a.part_lse[prow] = M + log2f(L);
    }
  }
  if (single) return;
  // Count this split in (threadfence reduction): the last of the group's n_active splits merges them all and
  // puts the counter back to zero for the next launch.
  __shared__ unsigned s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* c = a.counters + size_t(t) * gridDim.y + blockIdx.y;
    s_last = atomicAdd(c, 1u) == unsigned(plan.n_active - 1);
    if (s_last) *c = 0u;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int r = warp; r < n_rows; r += kWarps) combine_splits(a, t, head0 + r, plan.n_active, lane);
}

// One warp merges the na splits of (token t, query head h), in split order (log-sum-exp weights). The partials
// come from other CTAs of the same launch: read through L2 (ld.cg), after the arrival count's fences.
__device__ void combine_splits(const AttnArgs& a, int t, int h, int na, int lane) {
  const int D = a.head_dim;
  const size_t row0 = size_t(t) * a.n_splits * a.n_heads + h;  // split c: row0 + c * n_heads
  float M = -INFINITY;
  for (int c = lane; c < na; c += 32) M = fmaxf(M, __ldcg(a.part_lse + row0 + size_t(c) * a.n_heads));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
  constexpr int kPairsPerLane = 4;  // head_dim <= 256 = 32 lanes x 4 pairs
  float acc[kPairsPerLane][2] = {};
  float W = 0.f;
  for (int c = 0; c < na; ++c) {
    const size_t prow = row0 + size_t(c) * a.n_heads;
    const float w = exp2f(__ldcg(a.part_lse + prow) - M);
    W += w;
    const float* po = a.part_o + prow * D;
#pragma unroll
    for (int k = 0; k < kPairsPerLane; ++k) {
      const int d = 2 * lane + 64 * k;
      if (d < D) {
        const float2 v = __ldcg(reinterpret_cast<const float2*>(po + d));
        acc[k][0] += w * v.x;
        acc[k][1] += w * v.y;
      }
    }
  }
  const float inv = 1.f / W;
  bf16* dst = a.out + size_t(t) * a.n_heads * D + size_t(h) * D;
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    const int d = 2 * lane + 64 * k;
    if (d < D)
      *reinterpret_cast<__nv_bfloat162*>(dst + d) = __floats2bfloat162_rn(acc[k][0] * inv, acc[k][1] * inv);
  }
}

// ---- prefill / mixed ---------------------------------------------------------------------------------------

template <int DP, int KT>
__host__ __device__ constexpr size_t prefill_smem_bytes() {
  return size_t(kQRows + 4 * KT) * (DP + 8) * sizeof(bf16);  // Q + 2 stages of K and V
}

// grid (ceil(T * group / 64) + n_seqs, n_kv_heads). Block b finds its (sequence, 64-row tile) by a prefix sum
// of the sequences' tile counts; blocks beyond the last tile exit. Within a sequence the last (most keys)
// tiles come first.
template <int DP, int KT>
__global__ void __launch_bounds__(kThreads) attn_prefill_kernel(const AttnArgs a) {
  pdl_enter();
  constexpr int S = DP + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [64][S]
  bf16* sK = sQ + kQRows * S;                     // [2][KT][S]
  bf16* sV = sK + 2 * KT * S;                     // [2][KT][S]
  __shared__ int scan[kThreads];
  __shared__ int found_seq, found_tile;

  const int G = a.group;
  const int b = blockIdx.x;
  if (threadIdx.x == 0) found_seq = -1;
  int total = 0;
  for (int c0 = 0; c0 < a.n_seqs; c0 += kThreads) {
    const int i = c0 + threadIdx.x;
    const int cnt = i < a.n_seqs ? (a.seqs[i].n_tokens * G + kQRows - 1) / kQRows : 0;
    scan[threadIdx.x] = cnt;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) {  // inclusive Hillis-Steele scan
      const int v = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
      __syncthreads();
      scan[threadIdx.x] += v;
      __syncthreads();
    }
    const int incl = total + scan[threadIdx.x];
    if (cnt > 0 && b >= incl - cnt && b < incl) {
      found_seq = i;
      found_tile = b - (incl - cnt);
    }
    total += scan[kThreads - 1];
    __syncthreads();
    if (found_seq >= 0 || total > b) break;  // uniform: read after the barrier
  }
  if (found_seq < 0) return;

  const DevSeq sq = a.seqs[found_seq];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kvh = blockIdx.y;
  const int D = a.head_dim, q_dim = a.n_heads * D;
  const int n_rows_seq = sq.n_tokens * G;
  const int tile = (n_rows_seq + kQRows - 1) / kQRows - 1 - found_tile;
  const int r0 = tile * kQRows, r_end = min(r0 + kQRows, n_rows_seq);
  // Row r of the tile: token (r0 + r) / G of the sequence, query head kvh * G + (r0 + r) % G. Rows past the
  // end take the last row's position (they are computed, never stored), so positions grow with r.
  auto row_pos = [&](int r) { return sq.pos0 + min(r0 + r, r_end - 1) / G; };
  const int p_first = row_pos(0), p_last = row_pos(kQRows - 1);
  const int klo = a.window > 0 ? max(0, p_first - a.window + 1) : 0, khi = p_last;
  const int32_t* bt_row = a.kv.block_table + size_t(sq.kv_slot) * size_t(a.kv.max_blocks);
  const int kv_col = kvh * D;

  load_q_rows<DP, kQRows>(sQ, D, [&](int r) -> const bf16* {
    const int rr = r0 + r;
    if (rr >= r_end) return nullptr;
    return a.q + size_t(sq.token_begin + rr / G) * q_dim + size_t(kvh * G + rr % G) * D;
  });

  const int wr0 = warp * 16;
  const bool warp_active = r0 + wr0 < r_end;
  const int pos_a = row_pos(wr0 + (lane >> 2)), pos_b = row_pos(wr0 + (lane >> 2) + 8);
  const int pmin = row_pos(wr0), pmax = row_pos(wr0 + 15);

  float o[DP / 8][4];
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const int kt_first = klo / KT, kt_last = khi / KT;
  load_kv_tile<DP, KT>(sK, sV, a, bt_row, kv_col, kt_first * KT, klo, khi);
  cp_async_commit();
  for (int kt = kt_first; kt <= kt_last; ++kt) {
    const int buf = (kt - kt_first) & 1;
    if (kt < kt_last)
      load_kv_tile<DP, KT>(sK + (buf ^ 1) * KT * S, sV + (buf ^ 1) * KT * S, a, bt_row, kv_col, (kt + 1) * KT, klo,
                           khi);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int key0 = kt * KT;
    // Skip a tile no row of this warp can see (causal future, or entirely before every row's window).
    if (warp_active && key0 <= pmax && (a.window <= 0 || key0 + KT - 1 > pmin - a.window)) {
      const bool need_mask = !(key0 + KT - 1 <= pmin && (a.window <= 0 || key0 > pmax - a.window));
      attend_keys<DP, KT / 8>(sQ + wr0 * S, sK + buf * KT * S, sV + buf * KT * S, key0, pos_a, pos_b, a.window,
                              a.scale_log2, need_mask, o, m, l);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = r0 + wr0 + (lane >> 2) + 8 * r;
    if (rr >= r_end) continue;
    const float inv = 1.f / l[r];
    bf16* dst = a.out + size_t(sq.token_begin + rr / G) * q_dim + size_t(kvh * G + rr % G) * D;
#pragma unroll
    for (int nd = 0; nd < DP / 8; ++nd) {
      const int d = nd * 8 + 2 * (lane & 3);
      if (d < D)
        *reinterpret_cast<__nv_bfloat162*>(dst + d) = __floats2bfloat162_rn(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
    }
  }
}

// ---- K/V append --------------------------------------------------------------------------------------------

// One block per token; Word = the access unit (uint4: 8 bf16, uint32_t: 2, uint16_t: 1).
template <typename Word>
__global__ void kv_append_kernel(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                 const int32_t* __restrict__ token_seq, const DevSeq* __restrict__ seqs,
                                 const PagedKvLayer kv) {
  pdl_enter();
  constexpr int kPer = int(sizeof(Word) / sizeof(bf16));
  const int t = blockIdx.x;
  const DevSeq sq = seqs[token_seq[t]];
  const int pos = sq.pos0 + (t - sq.token_begin);
  const int page = pos / kBlockTokens;
  if (pos < 0 || page >= kv.max_blocks) return;  // outside the slot's table: the host sized it wrong
  const int blk = kv.block_table[size_t(sq.kv_slot) * size_t(kv.max_blocks) + page];
  if (blk < 0) return;
  const size_t dst = (size_t(blk) * kBlockTokens + size_t(pos % kBlockTokens)) * size_t(kv.kv_dim);
  const size_t src = size_t(t) * size_t(kv.kv_dim);
  const Word* ks = reinterpret_cast<const Word*>(k + src);
  const Word* vs = reinterpret_cast<const Word*>(v + src);
  Word* kd = reinterpret_cast<Word*>(kv.k + dst);
  Word* vd = reinterpret_cast<Word*>(kv.v + dst);
  for (int i = threadIdx.x; i < kv.kv_dim / kPer; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

// ---- host side ---------------------------------------------------------------------------------------------

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

int current_sm_count() {
  static std::atomic<int> counts[64] = {};
  int dev = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>& slot = counts[dev & 63];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    slot.store(n, std::memory_order_relaxed);
  }
  return n;
}

// Opt a kernel into more than 48 KiB of dynamic shared memory, once per device. `done` is the instantiation's
// own flag set (a static of the caller's template).
template <typename Kernel>
void ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  SPEAR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done.fetch_or(bit, std::memory_order_release);
}

template <int DP>
void ensure_decode_smem() {
  static std::atomic<uint64_t> done{0};
  ensure_smem(attn_decode_kernel<DP>, decode_smem_bytes<DP>(), done);
}

template <int DP>
void launch_decode(const AttnArgs& a, cudaStream_t stream) {
  constexpr size_t smem = decode_smem_bytes<DP>();
  ensure_decode_smem<DP>();
  const int head_blocks = (a.group + kDecodeRows - 1) / kDecodeRows;
  const dim3 grid(unsigned(a.n_splits), unsigned(a.n_kv_heads * head_blocks), unsigned(a.T));
  launch_kernel(attn_decode_kernel<DP>, grid, kThreads, smem, stream, a);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

template <int DP, int KT>
void launch_prefill(const AttnArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  constexpr size_t smem = prefill_smem_bytes<DP, KT>();
  ensure_smem(attn_prefill_kernel<DP, KT>, smem, done);
  const int64_t tiles = (int64_t(a.T) * a.group + kQRows - 1) / kQRows + a.n_seqs;
  SPEAR_CHECK(tiles < (int64_t(1) << 31), "attention_bf16: batch of {} tokens too large", a.T);
  const dim3 grid(unsigned(tiles), unsigned(a.n_kv_heads));
  launch_kernel(attn_prefill_kernel<DP, KT>, grid, kThreads, smem, stream, a);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

int padded_head_dim(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

int max_decode_splits(int max_blocks) {
  const int max_tiles = (max_blocks + kPagesPerDecodeTile - 1) / kPagesPerDecodeTile;
  const int cap = (max_tiles + kMinTilesPerSplit - 1) / kMinTilesPerSplit;
  return std::clamp(cap, 1, kMaxSplits);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Workspace layout of the decode split: the arrival counters (kCounterBytes), part_o [T][splits][n_heads][head_dim]
// fp32, then part_lse.
size_t decode_workspace_bytes(int T, int splits, int n_heads, int head_dim) {
  const size_t rows = size_t(T) * size_t(splits) * size_t(n_heads);
  return kCounterBytes + align256(rows * size_t(head_dim) * sizeof(float)) + rows * sizeof(float);
}

}  // namespace

size_t attention_workspace_bytes(int max_tokens, int n_heads, int head_dim, int max_blocks) {
  // Called at set-up, before any capture: opt the decode kernels into their shared memory now, so that a
  // captured step needs no cudaFuncSetAttribute call of its own.
  ensure_decode_smem<64>();
  ensure_decode_smem<128>();
  ensure_decode_smem<256>();
  if (max_tokens <= 0 || n_heads <= 0 || head_dim <= 0) return 0;
  // decode_splits(T) <= ceil(target / T) (at least one KV head) and <= max_decode_splits, so
  // T * splits <= min(T * max_splits, target + T).
  const size_t target = size_t(kDecodeCtasPerSm) * size_t(current_sm_count());
  const size_t rows = std::min(size_t(max_tokens) * size_t(max_decode_splits(max_blocks)), target + size_t(max_tokens));
  return kCounterBytes + align256(rows * size_t(n_heads) * size_t(head_dim) * sizeof(float)) +
         rows * size_t(n_heads) * sizeof(float);
}

size_t attention_workspace_zero_bytes() { return kCounterBytes; }

void kv_append_bf16(const __nv_bfloat16* k, const __nv_bfloat16* v, int T, const int32_t* token_seq,
                    const DevSeq* seqs, const PagedKvLayer& kv, cudaStream_t stream) {
  if (T <= 0) return;
  SPEAR_CHECK(kv.kv_dim > 0 && kv.k != nullptr && kv.v != nullptr, "kv_append_bf16: empty KV layer");
  const bool vec16 = kv.kv_dim % 8 == 0 && aligned(k, 16) && aligned(v, 16) && aligned(kv.k, 16) && aligned(kv.v, 16);
  const bool vec4 = kv.kv_dim % 2 == 0 && aligned(k, 4) && aligned(v, 4) && aligned(kv.k, 4) && aligned(kv.v, 4);
  if (vec16) {
    const int words = kv.kv_dim / 8;
    const int threads = words >= 128 ? 128 : (words + 31) / 32 * 32;
    launch_kernel(kv_append_kernel<uint4>, T, threads, 0, stream, k, v, token_seq, seqs, kv);
  } else if (vec4) {
    launch_kernel(kv_append_kernel<uint32_t>, T, 128, 0, stream, k, v, token_seq, seqs, kv);
  } else {
    launch_kernel(kv_append_kernel<uint16_t>, T, 128, 0, stream, k, v, token_seq, seqs, kv);
  }
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

namespace {

// The arguments every attention launch shares, checked.
AttnArgs attn_args(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                   const PagedKvLayer& kv, const AttnShape& shape, __nv_bfloat16* out) {
  const int D = shape.head_dim;
  SPEAR_CHECK(D > 0 && D % 2 == 0 && D <= 256, "attention_bf16: head_dim {} must be even and <= 256", D);
  SPEAR_CHECK(shape.n_kv_heads > 0 && shape.n_heads % shape.n_kv_heads == 0,
              "attention_bf16: {} query heads are not a multiple of {} KV heads", shape.n_heads, shape.n_kv_heads);
  SPEAR_CHECK(kv.kv_dim == shape.n_kv_heads * D, "attention_bf16: KV layer has kv_dim {}, the shape needs {}",
              kv.kv_dim, shape.n_kv_heads * D);
  SPEAR_CHECK(kv.max_blocks > 0 && kv.block_table != nullptr, "attention_bf16: KV layer without a block table");
  SPEAR_CHECK(aligned(q, 4) && aligned(out, 4) && aligned(kv.k, 4) && aligned(kv.v, 4),
              "attention_bf16: q, out and the K/V pools must be 4-byte aligned (bf16 pairs)");
  AttnArgs a{};
  a.q = q;
  a.token_seq = token_seq;
  a.seqs = seqs;
  a.n_seqs = n_seqs;
  a.T = T;
  a.kv = kv;
  a.n_heads = shape.n_heads;
  a.n_kv_heads = shape.n_kv_heads;
  a.head_dim = D;
  a.group = shape.n_heads / shape.n_kv_heads;
  a.window = shape.window;
  a.scale_log2 = shape.scale * kLog2e;
  a.vec16 = D % 8 == 0 && aligned(kv.k, 16) && aligned(kv.v, 16);
  a.out = out;
  return a;
}

// Every token is handled on its own (its position from seqs), so the decode kernel would also be right for
// sequences of several tokens without the fused RoPE; it is sized for one per sequence.
void run_decode(AttnArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const int T = a.T, D = a.head_dim;
  SPEAR_CHECK(T <= 65535, "attention_bf16: decode batch of {} tokens (at most 65535)", T);
  const int head_blocks = (a.group + kDecodeRows - 1) / kDecodeRows;
  const int ctas_per_split = T * a.n_kv_heads * head_blocks;
  const int target = kDecodeCtasPerSm * current_sm_count();
  int splits = std::clamp((target + ctas_per_split - 1) / ctas_per_split, 1, max_decode_splits(a.kv.max_blocks));
  if (size_t(ctas_per_split) > size_t(kMaxSplitGroups)) splits = 1;  // more groups than counters
  while (splits > 1 && (workspace == nullptr || decode_workspace_bytes(T, splits, a.n_heads, D) > workspace_bytes))
    --splits;
  a.n_splits = splits;
  if (splits > 1) {
    const size_t rows = size_t(T) * size_t(splits) * size_t(a.n_heads);
    char* ws = static_cast<char*>(workspace);
    a.counters = reinterpret_cast<unsigned*>(ws);
    a.part_o = reinterpret_cast<float*>(ws + kCounterBytes);
    a.part_lse = reinterpret_cast<float*>(ws + kCounterBytes + align256(rows * size_t(D) * sizeof(float)));
  }
  switch (padded_head_dim(D)) {
    case 64: launch_decode<64>(a, stream); break;
    case 128: launch_decode<128>(a, stream); break;
    default: launch_decode<256>(a, stream); break;
  }
}

}  // namespace

void attention_bf16(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                    const PagedKvLayer& kv, const AttnShape& shape, int max_ctx, bool decode, __nv_bfloat16* out,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  (void)max_ctx;  // lengths are read on the device; the launch never depends on them
  if (T <= 0 || n_seqs <= 0) return;
  AttnArgs a = attn_args(q, T, token_seq, seqs, n_seqs, kv, shape, out);
  if (decode) {
    run_decode(a, workspace, workspace_bytes, stream);
    return;
  }
  switch (padded_head_dim(shape.head_dim)) {
    case 64: launch_prefill<64, 64>(a, stream); break;
    case 128: launch_prefill<128, 64>(a, stream); break;
    default: launch_prefill<256, 32>(a, stream); break;
  }
}

void attention_decode_rope_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k_new, const __nv_bfloat16* v_new,
                                int T, const int32_t* positions, const float* inv_freq, const int32_t* token_seq,
                                const DevSeq* seqs, int n_seqs, const PagedKvLayer& kv, const AttnShape& shape,
                                __nv_bfloat16* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (T <= 0 || n_seqs <= 0) return;
  SPEAR_CHECK(T == n_seqs, "attention_decode_rope_bf16: {} tokens for {} sequences (one each)", T, n_seqs);
  SPEAR_CHECK(k_new && v_new && positions && inv_freq, "attention_decode_rope_bf16: null k, v, positions or table");
  AttnArgs a = attn_args(q, T, token_seq, seqs, n_seqs, kv, shape, out);
  a.k_new = k_new;
  a.v_new = v_new;
  a.positions = positions;
  a.inv_freq = inv_freq;
  run_decode(a, workspace, workspace_bytes, stream);
}

void attention_bf16(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                    const PagedKvLayer& kv, const AttnShape& shape, int max_ctx, bool decode, __nv_bfloat16* out,
                    cudaStream_t stream) {
  attention_bf16(q, T, token_seq, seqs, n_seqs, kv, shape, max_ctx, decode, out, nullptr, 0, stream);
}

}  // namespace spear::cuda
