// Causal GQA attention over the CPU KV cache. Scores and the weighted sum are small GEMMs (Eigen) on blocks
// of query rows, so a block only touches the keys it can see (the causal triangle costs ~1/2 + 1/(2·nblocks));
// heads run in parallel, each GEMM on one thread.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace spear {

namespace {
constexpr int kRowBlock = 64;
using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Strided = Eigen::Map<const RowMajor, 0, Eigen::OuterStride<>>;
using StridedOut = Eigen::Map<RowMajor, 0, Eigen::OuterStride<>>;

// One head, one block of query rows: rows [r0, r0 + nr) of the slice, keys [k_lo, k_lo + nk).
void attend_block(const float* q, int q_stride, const float* kc, const float* vc, int kv_stride, int hd, int nr,
                  int nk, int first_pos, int k_lo, int window, float scale, float* scores, float* out) {
  Strided Q(q, nr, hd, Eigen::OuterStride<>(q_stride));
  Strided K(kc, nk, hd, Eigen::OuterStride<>(kv_stride));
  Strided V(vc, nk, hd, Eigen::OuterStride<>(kv_stride));
  Eigen::Map<RowMajor> S(scores, nr, nk);
  S.noalias() = (Q * K.transpose()) * scale;
  for (int i = 0; i < nr; ++i) {
    const int pos = first_pos + i;
    const int lo = window > 0 ? std::max(0, pos - window + 1) : 0;  // first visible key
    float* row = scores + size_t(i) * nk;
    const int a = lo - k_lo, b = pos - k_lo;  // visible: [a, b]
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = a; j <= b; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
    for (int j = 0; j < nk; ++j) {
      float e = (j >= a && j <= b) ? std::exp(row[j] - mx) : 0.f;
      row[j] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
    for (int j = a; j <= b; ++j) row[j] *= inv;
  }
  StridedOut O(out, nr, hd, Eigen::OuterStride<>(q_stride));
  O.noalias() = S * V;
}
}  // namespace

void CpuBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const SeqSlice> seqs,
                           KvCache& cache_base, const AttentionParams& p, Tensor& out) {
  auto& cache = static_cast<CpuKvCache&>(cache_base);
  const int hd = p.head_dim;
  const int q_dim = p.n_heads * hd;
  const int kv_dim = p.n_kv_heads * hd;
  const int group = p.n_heads / p.n_kv_heads;
  if (cache.kv_dim() != kv_dim) fail("attention: KV cache has kv_dim {}, layer needs {}", cache.kv_dim(), kv_dim);

  for (const SeqSlice& s : seqs) {
    const int L = s.pos0 + s.n_tokens;  // keys visible to the last query
    if (L > cache.max_tokens())
      fail("sequence of {} tokens exceeds the KV cache capacity of {} tokens", L, cache.max_tokens());
    float* kc = cache.k(p.layer, s.kv_slot);
    float* vc = cache.v(p.layer, s.kv_slot);
    std::memcpy(kc + size_t(s.pos0) * kv_dim, k.ptr<float>() + size_t(s.token_begin) * kv_dim,
                size_t(s.n_tokens) * kv_dim * sizeof(float));
    std::memcpy(vc + size_t(s.pos0) * kv_dim, v.ptr<float>() + size_t(s.token_begin) * kv_dim,
                size_t(s.n_tokens) * kv_dim * sizeof(float));

    const float* qs = q.ptr<float>() + size_t(s.token_begin) * q_dim;
    float* os = out.ptr<float>() + size_t(s.token_begin) * q_dim;
    const int n_blocks = (s.n_tokens + kRowBlock - 1) / kRowBlock;
#pragma omp parallel
    {
      std::vector<float> scores;
#pragma omp for collapse(2) schedule(dynamic)
      for (int blk = 0; blk < n_blocks; ++blk) {
        for (int h = 0; h < p.n_heads; ++h) {
          const int r0 = blk * kRowBlock;
          const int nr = std::min(kRowBlock, s.n_tokens - r0);
          const int last_pos = s.pos0 + r0 + nr - 1;
          // Keys this block can see: [k_lo, last_pos]. With a window, the first row sees the fewest.
          const int k_lo = p.window > 0 ? std::max(0, s.pos0 + r0 - p.window + 1) : 0;
          const int nk = last_pos - k_lo + 1;
          scores.resize(size_t(nr) * nk);
          const int kvh = h / group;
          attend_block(qs + size_t(r0) * q_dim + h * hd, q_dim, kc + size_t(k_lo) * kv_dim + kvh * hd,
                       vc + size_t(k_lo) * kv_dim + kvh * hd, kv_dim, hd, nr, nk, s.pos0 + r0, k_lo, p.window,
                       p.scale, scores.data(), os + size_t(r0) * q_dim + h * hd);
        }
      }
    }
  }
}

}  // namespace spear
