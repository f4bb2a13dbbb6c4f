// Decode attention (one new token per sequence; attention.cu has the overview): a CTA takes one token, one KV head
// (up to 16 query heads, padded to the 16 rows of an mma) and one split of the context; each of the 4 warps owns 16
// keys of every 64-key tile, the warps merge in shared memory. With several splits (flash-decoding) each split
// writes its normalised partial output and log-sum-exp to the workspace and counts itself in; the last split of a
// (token, head block) to arrive merges them in split order. With RoPE fused in (attention_decode_rope_bf16) the
// CTAs also rotate their query rows and the last split takes the new key and value straight from the q/k/v output.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_tiles.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope_rotate.cuh"

namespace spear::cuda {

namespace attn_detail {

namespace {

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

// ---- host side ---------------------------------------------------------------------------------------------

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

}  // namespace attn_detail

using namespace attn_detail;

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

}  // namespace spear::cuda
