#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace spear {

int32_t argmax(std::span<const float> v) {
  // First maximum, as torch.argmax does.
  return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  if (!(p.temperature >= 0.f) || !std::isfinite(p.temperature)) fail("temperature must be a finite number >= 0");
  if (p.top_k < 0) fail("top_k must be >= 0");
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) fail("top_p must be in (0, 1]");
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (p_.temperature == 0.f) return argmax(logits);
  const int n = int(logits.size());
  if (p_.top_k == 0 && p_.top_p >= 1.f) {
    // Plain temperature sampling needs no sort: inverse CDF over the softmax in vocabulary order.
    const float mx = *std::max_element(logits.begin(), logits.end());
    std::vector<double> prob(static_cast<size_t>(n));
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += prob[size_t(i)] = std::exp((logits[size_t(i)] - mx) / p_.temperature);
    double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
    for (int i = 0; i < n; ++i) {
      u -= prob[size_t(i)];
      if (u < 0) return i;
    }
    return n - 1;
  }
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  int keep = n;
  if (p_.top_k > 0 && p_.top_k < n) {
    keep = p_.top_k;
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(),
                      [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  } else {
    std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  }
  // Softmax over the kept candidates at the given temperature, in double for a stable cumulative sum.
  std::vector<double> prob(static_cast<size_t>(keep));
  const double mx = logits[size_t(idx[0])];
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += prob[size_t(i)] = std::exp((logits[size_t(idx[size_t(i)])] - mx) / p_.temperature);
  for (auto& q : prob) q /= sum;
  if (p_.top_p < 1.f) {
    double cum = 0;
    int cut = keep;
    for (int i = 0; i < keep; ++i) {
      cum += prob[size_t(i)];
      if (cum >= p_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
  }
  std::discrete_distribution<int> dist(prob.begin(), prob.begin() + keep);
  return idx[size_t(dist(rng_))];
}

}  // namespace spear
