// One block per token: the token's cos / sin table in shared memory, then its q heads, its k heads (rotated in
// place and stored into the cache) and its v row (stored into the cache).
#include "backend/cuda/rope_kv_append.h"

#include "backend/cuda/cuda_check.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ void rotate_pair(bf16* v, int i, int half, float c, float s, bf16* dst) {
  const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
  const bf16 lo = __float2bfloat16_rn(a * c - b * s), hi = __float2bfloat16_rn(b * c + a * s);
  v[i] = lo;
  v[i + half] = hi;
  if (dst) {
    dst[i] = lo;
    dst[i + half] = hi;
  }
}

__global__ void rope_kv_append_kernel(bf16* q, bf16* k, const bf16* __restrict__ v, int n_heads, int head_dim,
                                      const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                                      const int32_t* __restrict__ token_seq, const DevSeq* __restrict__ seqs,
                                      const PagedKvLayer kv) {
  extern __shared__ float cs_sn[];  // [half] cos, then [half] sin
  const int half = head_dim / 2;
  float* cs = cs_sn;
  float* sn = cs_sn + half;
  const int t = blockIdx.x;
  const float angle_pos = float(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) sincosf(angle_pos * inv_freq[i], &sn[i], &cs[i]);

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
  for (int e = threadIdx.x; e < (n_heads + n_kv_heads) * half; e += blockDim.x) {
    const int h = e / half, i = e - h * half;
    if (h < n_heads) {
      rotate_pair(qt + size_t(h) * head_dim, i, half, cs[i], sn[i], nullptr);
    } else {
      const size_t off = size_t(h - n_heads) * head_dim;
      rotate_pair(kt + off, i, half, cs[i], sn[i], kd ? kd + off : nullptr);
    }
  }
  if (vd) {
    const bf16* vt = v + size_t(t) * size_t(kv.kv_dim);
    for (int i = threadIdx.x; i < kv.kv_dim; i += blockDim.x) vd[i] = vt[i];
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
  const int work = (n_heads + kv.kv_dim / head_dim) * (head_dim / 2);
  const int threads = work >= 256 ? 256 : (work + 31) / 32 * 32;
  rope_kv_append_kernel<<<T, threads, size_t(head_dim) * sizeof(float), stream>>>(
      q, k, v, n_heads, head_dim, positions, inv_freq, token_seq, seqs, kv);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
