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
#include "backend/cuda/attention_tiles.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"

namespace spear::cuda {

namespace attn_detail {

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

namespace {

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

}  // namespace

}  // namespace attn_detail

using namespace attn_detail;

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



void attention_bf16(const __nv_bfloat16* q, int T, const int32_t* token_seq, const DevSeq* seqs, int n_seqs,
                    const PagedKvLayer& kv, const AttnShape& shape, int max_ctx, bool decode, __nv_bfloat16* out,
                    cudaStream_t stream) {
  attention_bf16(q, T, token_seq, seqs, n_seqs, kv, shape, max_ctx, decode, out, nullptr, 0, stream);
}

}  // namespace spear::cuda
