#include "eval/compare.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>

#include <omp.h>

#include "core/error.h"
#include "core/progress.h"

namespace spear {

namespace {

// log-softmax of one row, double accumulation, into out.
void log_softmax(const float* x, int V, std::vector<double>& out) {
  float mx = *std::max_element(x, x + V);
  double s = 0;
  for (int i = 0; i < V; ++i) s += std::exp(double(x[i] - mx));
  const double lse = double(mx) + std::log(s);
  out.resize(size_t(V));
  for (int i = 0; i < V; ++i) out[size_t(i)] = double(x[i]) - lse;
}

}  // namespace

KlSummary summarize_kl(const std::vector<float>& kl) {
  KlSummary s;
  if (kl.empty()) return s;
  std::vector<float> v = kl;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (float x : v) sum += x;
  s.mean = sum / double(v.size());
  auto q = [&](double p) { return double(v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))]); };
  s.p10 = q(0.10), s.p50 = q(0.50), s.p90 = q(0.90), s.p99 = q(0.99);
  return s;
}

std::vector<ModelScore> compare_models(const std::vector<Model*>& models, const std::vector<int32_t>& tokens, int ctx,
                                       int max_windows, long* tokens_scored) {
  if (models.empty()) fail("compare: no models");
  if (ctx < 2) fail("context must be at least 2 tokens");
  const int V = models[0]->config().vocab_size;
  for (Model* m : models) {
    if (m->config().vocab_size != V) fail("compare: models have different vocabularies");
    if (ctx > m->config().max_position_embeddings) fail("context {} exceeds a model's context {}", ctx, m->config().max_position_embeddings);
  }
  int n_windows = int(tokens.size() / size_t(ctx));
  if (max_windows > 0) n_windows = std::min(n_windows, max_windows);
  if (n_windows == 0) fail("text has {} tokens, fewer than one window of {}", tokens.size(), ctx);
  const size_t M = models.size(), per_win = size_t(ctx - 1);
  std::vector<ModelScore> out(M);
  std::vector<std::vector<double>> win_nll(M, std::vector<double>(size_t(n_windows), 0.0));
  for (size_t i = 1; i < M; ++i) out[i].kl.assign(size_t(n_windows) * per_win, 0.f);

  bool parallel = omp_get_max_threads() > 1 && n_windows > 1;
  for (Model* m : models) parallel = parallel && m->backend().concurrent_forwards();
  ProgressBar bar("evaluating " + std::to_string(M) + " models", n_windows);
  std::atomic<int> done{0};
  std::exception_ptr error;
#pragma omp parallel if (parallel)
  {
    std::vector<std::unique_ptr<KvCache>> caches;
    for (Model* m : models) caches.push_back(m->make_kv_cache(1, ctx));
    std::vector<double> ref_lp, lp;
    std::vector<std::vector<double>> ref_rows(per_win);
#pragma omp for schedule(dynamic, 1)
    for (int w = 0; w < n_windows; ++w) {
      if (error) continue;
      try {
        std::span<const int32_t> win(tokens.data() + size_t(w) * ctx, size_t(ctx));
        for (size_t mi = 0; mi < M; ++mi) {
          std::vector<float> logits = models[mi]->forward(Batch::single(win, 0), *caches[mi], LogitsMode::All);
          double s = 0;
          for (size_t t = 0; t < per_win; ++t) {
            log_softmax(logits.data() + t * V, V, lp);
            s -= lp[size_t(win[t + 1])];
            if (mi == 0) {
              ref_rows[t] = lp;
            } else {
              const std::vector<double>& p = ref_rows[t];
              double kl = 0;
              for (int v = 0; v < V; ++v) kl += std::exp(p[size_t(v)]) * (p[size_t(v)] - lp[size_t(v)]);
              out[mi].kl[size_t(w) * per_win + t] = float(std::max(0.0, kl));
            }
          }
          win_nll[mi][size_t(w)] = s;
        }
      } catch (...) {
#pragma omp critical
        error = std::current_exception();
      }
      int d = ++done;
      if (omp_get_thread_num() == 0) bar.update(d);
    }
  }
  if (error) std::rethrow_exception(error);
  bar.finish();
  const double n = double(n_windows) * double(per_win);
  for (size_t mi = 0; mi < M; ++mi) {
    double s = 0;
    for (double x : win_nll[mi]) s += x;  // window order: independent of the thread count
    out[mi].mean_nll = s / n;
    out[mi].ppl = std::exp(out[mi].mean_nll);
  }
  if (tokens_scored) *tokens_scored = long(n);
  return out;
}

}  // namespace spear
