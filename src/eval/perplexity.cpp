#include "eval/perplexity.h"

#include <atomic>
#include <chrono>
#include <exception>

#include <omp.h>
#include <cmath>

#include "core/error.h"
#include "core/progress.h"

namespace spear {

double token_nll(const float* logits, int vocab, int32_t target) {
  float mx = logits[0];
  for (int i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(double(logits[i] - mx));
  return std::log(sum) + double(mx) - double(logits[target]);
}

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int ctx, int max_windows) {
  if (ctx < 2) fail("context must be at least 2 tokens");
  if (ctx > model.config().max_position_embeddings)
    fail("context {} exceeds the model's max_position_embeddings {}", ctx, model.config().max_position_embeddings);
  PerplexityResult r;
  r.ctx = ctx;
  r.text_tokens = long(tokens.size());
  int n_windows = int(tokens.size() / size_t(ctx));
  if (max_windows > 0) n_windows = std::min(n_windows, max_windows);
  if (n_windows == 0) fail("text has {} tokens, fewer than one window of {}", tokens.size(), ctx);
  const int vocab = model.config().vocab_size;
  auto t0 = std::chrono::steady_clock::now();
  // Per-window sums, added in window order at the end, so the result does not depend on thread count.
  std::vector<double> win_nll(size_t(n_windows), 0.0), win_sq(size_t(n_windows), 0.0);
  ProgressBar bar("perplexity", n_windows);
  std::atomic<int> done{0};
  auto run_window = [&](int w, KvCache& cache) {
    std::span<const int32_t> win(tokens.data() + size_t(w) * ctx, size_t(ctx));
    std::vector<float> logits = model.forward(Batch::single(win, 0), cache, LogitsMode::All);
    double s = 0, sq = 0;
    for (int i = 0; i < ctx - 1; ++i) {
      double nll = token_nll(logits.data() + size_t(i) * vocab, vocab, win[size_t(i + 1)]);
      s += nll;
      sq += nll * nll;
    }
    win_nll[size_t(w)] = s;
    win_sq[size_t(w)] = sq;
  };
  // On the CPU, whole windows run in parallel with single-threaded ops: measured 1.35x the throughput of
  // splitting each GEMM over the 2 cores of the CI machine (which was slower than 1 thread).
  const bool parallel_windows = model.backend().concurrent_forwards() && omp_get_max_threads() > 1 && n_windows > 1;
  std::exception_ptr error;
#pragma omp parallel if (parallel_windows)
  {
    std::unique_ptr<KvCache> cache = model.make_kv_cache(1, ctx);
#pragma omp for schedule(dynamic, 1)
    for (int w = 0; w < n_windows; ++w) {
      if (error) continue;
      try {
        run_window(w, *cache);
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
  double nll_sum = 0, nll_sq = 0;
  for (int w = 0; w < n_windows; ++w) {
    nll_sum += win_nll[size_t(w)];
    nll_sq += win_sq[size_t(w)];
  }
  r.windows = n_windows;
  r.tokens_scored = long(n_windows) * (ctx - 1);
  r.mean_nll = nll_sum / double(r.tokens_scored);
  r.ppl = std::exp(r.mean_nll);
  const double n = double(r.tokens_scored);
  const double var = std::max(0.0, nll_sq / n - r.mean_nll * r.mean_nll);
  r.ppl_stderr = r.ppl * std::sqrt(var / n);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace spear
