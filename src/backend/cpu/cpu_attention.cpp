// Causal GQA attention over the CPU KV cache. Scores and the weighted sum go through sgemm on blocks of
// query rows, so a block only touches the keys it can see (the causal triangle costs ~1/2 + 1/(2·nblocks)).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <cblas.h>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace spear {

namespace {
constexpr int kRowBlock = 64;
}

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
    std::vector<float> scores;
    for (int r0 = 0; r0 < s.n_tokens; r0 += kRowBlock) {
      const int nr = std::min(kRowBlock, s.n_tokens - r0);
      const int last_pos = s.pos0 + r0 + nr - 1;
      // Keys this block can see: [k_lo, last_pos]. With a window, the first row sees the fewest.
      const int k_lo = p.window > 0 ? std::max(0, s.pos0 + r0 - p.window + 1) : 0;
      const int nk = last_pos - k_lo + 1;
      scores.resize(size_t(nr) * nk);
      for (int h = 0; h < p.n_heads; ++h) {
        const int kvh = h / group;
        // S[nr, nk] = scale · Q_h[nr, hd] · K_h[k_lo.., hd]ᵀ
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nr, nk, hd, p.scale, qs + size_t(r0) * q_dim + h * hd,
                    q_dim, kc + size_t(k_lo) * kv_dim + kvh * hd, kv_dim, 0.f, scores.data(), nk);
#pragma omp parallel for if (nr * nk > 4096)
        for (int i = 0; i < nr; ++i) {
          const int pos = s.pos0 + r0 + i;
          const int lo = p.window > 0 ? std::max(0, pos - p.window + 1) : 0;  // first visible key
          float* row = scores.data() + size_t(i) * nk;
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
        // O_h[nr, hd] = P[nr, nk] · V_h[k_lo.., hd]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nr, hd, nk, 1.f, scores.data(), nk,
                    vc + size_t(k_lo) * kv_dim + kvh * hd, kv_dim, 0.f, os + size_t(r0) * q_dim + h * hd, q_dim);
      }
    }
  }
}

}  // namespace spear
