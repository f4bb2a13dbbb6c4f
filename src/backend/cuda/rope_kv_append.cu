// One block per token: the token's cos / sin table in shared memory, then its q heads, its k heads (rotated in
// place and stored into the cache) and its v row (stored into the cache).
#include "backend/cuda/rope_kv_append.h"

#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope_rotate.cuh"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;

using bf162 = __nv_bfloat162;

// Rotates the pair (v[i], v[i + half]) in place and copies it to dst (when given). kPairs2: two adjacent pairs
// (i, i + 1) at once through bf16x2 accesses.
template <bool kPairs2>
__device__ __forceinline__ void rotate(bf16* v, int i, int half, const float* cs, const float* sn, bf16* dst) {
  if constexpr (kPairs2) {
    bf162* p1 = reinterpret_cast<bf162*>(v + i);
    bf162* p2 = reinterpret_cast<bf162*>(v + i + half);
    bf162 lo, hi;
    rope_rotate2(*p1, *p2, cs[i], cs[i + 1], sn[i], sn[i + 1], lo, hi);
    *p1 = lo;
    *p2 = hi;
    if (dst) {
      *reinterpret_cast<bf162*>(dst + i) = lo;
      *reinterpret_cast<bf162*>(dst + i + half) = hi;
    }
  } else {
    bf16 lo, hi;
    rope_rotate(__bfloat162float(v[i]), __bfloat162float(v[i + half]), cs[i], sn[i], lo, hi);
    v[i] = lo;
    v[i + half] = hi;
    if (dst) {
      dst[i] = lo;
      dst[i + half] = hi;
    }
  }
}

template <bool kPairs2>
__global__ void rope_kv_append_kernel(bf16* q, bf16* k, const bf16* __restrict__ v, int n_heads, int head_dim,
                                      const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                                      const int32_t* __restrict__ token_seq, const DevSeq* __restrict__ seqs,
                                      const PagedKvLayer kv) {
  pdl_enter();
  extern __shared__ float cs_sn[];  // [half] cos, then [half] sin
  const int half = head_dim / 2;
  float* cs = cs_sn;
  float* sn = cs_sn + half;
  const int t = blockIdx.x;
  rope_angles(float(positions[t]), inv_freq, half, cs, sn, threadIdx.x, blockDim.x);

  // The cache row of this token (as kv_append_bf16); null when outside the slot's pages.
  const DevSeq sq = seqs[token_seq[t]];
  const int pos = sq.pos0 + (t - sq.token_begin);
  const int page = pos / kBlockTokens;
  bf16 *kd = nullptr, *vd = nullptr;
  if (pos >= 0 && page < kv.max_blocks) {
    const int blk = kv.block_table[size_t(sq.kv_slot) * size_t(kv.max_blocks) + page];
    if (blk >= 0) {
      const size_t dst = (size_t(blk) * kBlockTokens + size_t(pos % kBlockTokens)) * size_t(kv.kv_dim);
      kd = kv.k + dst;
      vd = kv.v + dst;
    }
  }
  __syncthreads();

  const int n_kv_heads = kv.kv_dim / head_dim;
  bf16* qt = q + size_t(t) * size_t(n_heads) * head_dim;
  bf16* kt = k + size_t(t) * size_t(kv.kv_dim);
  constexpr int kStep = kPairs2 ? 2 : 1;
  const int per_head = half / kStep;
  for (int e = threadIdx.x; e < (n_heads + n_kv_heads) * per_head; e += blockDim.x) {
    const int h = e / per_head, i = (e - h * per_head) * kStep;
    if (h < n_heads) {
      rotate<kPairs2>(qt + size_t(h) * head_dim, i, half, cs, sn, nullptr);
    } else {
      const size_t off = size_t(h - n_heads) * head_dim;
      rotate<kPairs2>(kt + off, i, half, cs, sn, kd ? kd + off : nullptr);
    }
  }
  if (vd) {
    const bf16* vt = v + size_t(t) * size_t(kv.kv_dim);
    if (kPairs2 && kv.kv_dim % 8 == 0 && (reinterpret_cast<uintptr_t>(vt) | reinterpret_cast<uintptr_t>(vd)) % 16 == 0) {
      for (int i = threadIdx.x; i < kv.kv_dim / 8; i += blockDim.x)
        reinterpret_cast<uint4*>(vd)[i] = reinterpret_cast<const uint4*>(vt)[i];
    } else {
      for (int i = threadIdx.x; i < kv.kv_dim; i += blockDim.x) vd[i] = vt[i];
    }
  }
}

}  // namespace

void rope_kv_append_bf16(__nv_bfloat16* q, __nv_bfloat16* k, const __nv_bfloat16* v, int T, int n_heads,
                         int head_dim, const int32_t* positions, const float* inv_freq, const int32_t* token_seq,
                         const DevSeq* seqs, const PagedKvLayer& kv, cudaStream_t stream) {
  if (T <= 0) return;
  SPEAR_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024, "rope_kv_append_bf16: head_dim {}", head_dim);
  SPEAR_CHECK(kv.kv_dim > 0 && kv.kv_dim % head_dim == 0 && kv.k && kv.v,
              "rope_kv_append_bf16: KV layer kv_dim {} is not a multiple of head_dim {}", kv.kv_dim, head_dim);
  // bf16x2 accesses when every pair start is 4-byte aligned (half even, all rows at even offsets).
  auto al4 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; };
  const bool pairs2 = (head_dim / 2) % 2 == 0 && al4(q) && al4(k) && al4(kv.k);
  const int work = (n_heads + kv.kv_dim / head_dim) * (head_dim / 2) / (pairs2 ? 2 : 1);
  const int threads = work >= 256 ? 256 : (work + 31) / 32 * 32;
  const size_t smem = size_t(head_dim) * sizeof(float);
  launch_kernel(pairs2 ? rope_kv_append_kernel<true> : rope_kv_append_kernel<false>, T, threads, smem, stream, q, k,
                v, n_heads, head_dim, positions, inv_freq, token_seq, seqs, kv);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
