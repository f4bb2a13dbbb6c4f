#include "eval/perplexity.h"

#include <chrono>
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
  auto cache = model.make_kv_cache(1, ctx);
  auto t0 = std::chrono::steady_clock::now();
  double nll_sum = 0, nll_sq = 0;
  ProgressBar bar("perplexity", n_windows);
  for (int w = 0; w < n_windows; ++w) {
    std::span<const int32_t> win(tokens.data() + size_t(w) * ctx, size_t(ctx));
    std::vector<float> logits = model.forward(Batch::single(win, 0), *cache, LogitsMode::All);
    double window_nll = 0, window_sq = 0;
#pragma omp parallel for reduction(+ : window_nll, window_sq)
    for (int i = 0; i < ctx - 1; ++i) {
      double nll = token_nll(logits.data() + size_t(i) * vocab, vocab, win[size_t(i + 1)]);
      window_nll += nll;
      window_sq += nll * nll;
    }
    nll_sum += window_nll;
    nll_sq += window_sq;
    r.tokens_scored += ctx - 1;
    r.windows = w + 1;
    bar.update(w + 1, "ppl " + std::to_string(std::exp(nll_sum / double(r.tokens_scored))).substr(0, 7));
  }
  bar.finish();
  r.mean_nll = nll_sum / double(r.tokens_scored);
  r.ppl = std::exp(r.mean_nll);
  const double n = double(r.tokens_scored);
  const double var = std::max(0.0, nll_sq / n - r.mean_nll * r.mean_nll);
  r.ppl_stderr = r.ppl * std::sqrt(var / n);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace spear
