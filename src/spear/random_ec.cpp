#include "spear/random_ec.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/error.h"
#include "model/model.h"

namespace spear {

std::vector<Compensator> attach_random_compensators(Model& model, double density, int rank, int gate_width,
                                                    uint64_t seed, const std::vector<std::string>& kinds) {
  SPEAR_CHECK(density >= 0.0 && density <= 1.0, "EC density {} is outside [0, 1]", density);
  SPEAR_CHECK(rank >= 1 && gate_width >= 0, "EC rank {} / gate width {}: rank must be >= 1, gate width >= 0", rank,
              gate_width);
  // Whole-module shapes (under tensor parallelism the linears hold one rank's shard; every rank draws the same
  // compensators and keeps its part).
  std::vector<std::string> all = model.linear_names();
  const auto dims = model.linear_dims();
  if (!kinds.empty()) {
    auto is_kind = [](const std::string& name, const std::string& kind) {
      return name.size() > kind.size() && name.compare(name.size() - kind.size(), kind.size(), kind) == 0 &&
             name[name.size() - kind.size() - 1] == '.';
    };
    for (const std::string& k : kinds)
      SPEAR_CHECK(std::any_of(all.begin(), all.end(), [&](const std::string& n) { return is_kind(n, k); }),
                  "EC module kind '{}' matches no linear of the model (names end in e.g. '{}')", k,
                  all.empty() ? std::string("q_proj") : all.front().substr(all.front().rfind('.') + 1));
    std::erase_if(all, [&](const std::string& n) {
      return std::none_of(kinds.begin(), kinds.end(), [&](const std::string& k) { return is_kind(n, k); });
    });
  }
  const size_t n = size_t(std::lround(density * double(all.size())));
  std::vector<size_t> idx(all.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(n);
  std::sort(idx.begin(), idx.end());  // forward order
  std::vector<Compensator> ecs;
  ecs.reserve(n);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (size_t i : idx) {
    const auto [out, in] = dims.at(all[i]);
    Compensator c;
    c.module = all[i];
    c.resize(in, out, rank, 0);
    const float sa = 1.f / std::sqrt(float(in)), sb = 0.02f / std::sqrt(float(rank));
    for (float& v : c.A) v = sa * nd(rng);
    for (float& v : c.B) v = sb * nd(rng);
    if (gate_width > 0) {
      c.init_gate(gate_width, 1.f / std::sqrt(float(rank)), rng());
      for (float& v : c.W2) v = 0.1f * nd(rng) / std::sqrt(float(gate_width));  // a gate that is not exactly 1
    }
    c.round_to_bf16();
    model.attach_compensator(c);
    ecs.push_back(std::move(c));
  }
  return ecs;
}

void detach_compensators(Model& model) {
  for (auto& layer : model.layers())
    for (Linear* l : layer.linears()) model.backend().set_compensator(*l, nullptr);
}

}  // namespace spear
