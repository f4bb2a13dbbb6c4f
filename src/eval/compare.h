#pragma once
// Several models scored on the same windows in one pass: each one's perplexity (the protocol of
// perplexity.h) and, for every model after the first, the per-token KL divergence KL(p_ref ‖ p_model) of
// the next-token distributions against the first (the reference, e.g. the full-precision model).
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace spear {

struct ModelScore {
  double ppl = 0, mean_nll = 0;
  std::vector<float> kl;  // per scored token, window after window (empty for the reference)
};

struct KlSummary {
  double mean = 0, p10 = 0, p50 = 0, p90 = 0, p99 = 0;
};
KlSummary summarize_kl(const std::vector<float>& kl);

// models[0] is the reference. Windows run in parallel on backends that allow concurrent forwards.
std::vector<ModelScore> compare_models(const std::vector<Model*>& models, const std::vector<int32_t>& tokens, int ctx,
                                       int max_windows, long* tokens_scored = nullptr);

}  // namespace spear
