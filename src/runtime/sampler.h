#pragma once
// Token sampling: greedy (temperature 0), or temperature with top-k and top-p (nucleus) filtering, seeded.
#include <cstdint>
#include <random>
#include <span>

namespace spear {

struct SamplingParams {
  float temperature = 0.f;  // 0 = greedy
  int top_k = 0;            // 0 = off
  float top_p = 1.f;        // 1 = off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(std::span<const float> logits);
  // Temperature 0: the first maximum of the logits, which Model::forward_greedy computes on the device.
  bool greedy() const { return p_.temperature == 0.f; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

int32_t argmax(std::span<const float> v);

}  // namespace spear
