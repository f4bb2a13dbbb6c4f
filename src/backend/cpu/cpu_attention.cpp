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
  // Decode rows (a few queries) are dot products; Eigen's GEMM set-up would cost more than the work.
  const bool small = nr <= 4;
  if (small) {
    for (int i = 0; i < nr; ++i)
      for (int j = 0; j < nk; ++j) {
        const float* qi = q + size_t(i) * q_stride;
        const float* kj = kc + size_t(j) * kv_stride;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int e = 0; e < hd; ++e) d += qi[e] * kj[e];
        scores[size_t(i) * nk + j] = d * scale;
      }
  } else {
    S.noalias() = (Q * K.transpose()) * scale;
  }
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
  if (small) {
    for (int i = 0; i < nr; ++i) {
      float* o = out + size_t(i) * q_stride;
      for (int e = 0; e < hd; ++e) o[e] = 0.f;
      const float* pi = scores + size_t(i) * nk;
      for (int j = 0; j < nk; ++j) {
        const float pj = pi[j];
        if (pj == 0.f) continue;  // masked
        const float* vj = vc + size_t(j) * kv_stride;
#pragma omp simd
        for (int e = 0; e < hd; ++e) o[e] += pj * vj[e];
      }
    }
    return;
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

  // Append every sequence's new keys and values, then one parallel loop over all (sequence, row block, head)
  // work items: a batch of many short sequences (decode) must not pay one parallel region per sequence.
  struct Item {
    int seq, blk, head;
  };
  std::vector<Item> items;
  for (int si = 0; si < int(seqs.size()); ++si) {
    const SeqSlice& s = seqs[size_t(si)];
    if (s.pos0 + s.n_tokens > cache.max_tokens())
      fail("sequence of {} tokens exceeds the KV cache capacity of {} tokens", s.pos0 + s.n_tokens, cache.max_tokens());
    std::memcpy(cache.k(p.layer, s.kv_slot) + size_t(s.pos0) * kv_dim, k.ptr<float>() + size_t(s.token_begin) * kv_dim,
                size_t(s.n_tokens) * kv_dim * sizeof(float));
    std::memcpy(cache.v(p.layer, s.kv_slot) + size_t(s.pos0) * kv_dim, v.ptr<float>() + size_t(s.token_begin) * kv_dim,
                size_t(s.n_tokens) * kv_dim * sizeof(float));
    const int n_blocks = (s.n_tokens + kRowBlock - 1) / kRowBlock;
    for (int blk = 0; blk < n_blocks; ++blk)
      for (int h = 0; h < p.n_heads; ++h) items.push_back({si, blk, h});
  }
  size_t work = 0;
  for (const SeqSlice& s : seqs) work += size_t(s.n_tokens) * size_t(s.pos0 + s.n_tokens);
#pragma omp parallel if (work * size_t(p.n_heads) > 32768)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic)
    for (size_t it = 0; it < items.size(); ++it) {
      const SeqSlice& s = seqs[size_t(items[it].seq)];
      const int h = items[it].head;
      const int r0 = items[it].blk * kRowBlock;
      const int nr = std::min(kRowBlock, s.n_tokens - r0);
      const int last_pos = s.pos0 + r0 + nr - 1;
      // Keys this block can see: [k_lo, last_pos]. With a window, the first row sees the fewest.
      const int k_lo = p.window > 0 ? std::max(0, s.pos0 + r0 - p.window + 1) : 0;
      const int nk = last_pos - k_lo + 1;
      scores.resize(size_t(nr) * nk);
      const int kvh = h / group;
      const float* qs = q.ptr<float>() + size_t(s.token_begin) * q_dim;
      float* os = out.ptr<float>() + size_t(s.token_begin) * q_dim;
      const float* kc = cache.k(p.layer, s.kv_slot);
      const float* vc = cache.v(p.layer, s.kv_slot);
      attend_block(qs + size_t(r0) * q_dim + h * hd, q_dim, kc + size_t(k_lo) * kv_dim + kvh * hd,
                   vc + size_t(k_lo) * kv_dim + kvh * hd, kv_dim, hd, nr, nk, s.pos0 + r0, k_lo, p.window, p.scale,
                   scores.data(), os + size_t(r0) * q_dim + h * hd);
    }
  }
}

}  // namespace spear
