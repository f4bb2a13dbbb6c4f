#include "spear/placement.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <fmt/format.h>

#include "core/error.h"
#include "spear/compensator.h"

namespace spear {

std::vector<std::string> placement_rules() { return {"spear", "uniform", "top-damage", "random"}; }

namespace {

size_t ec_bytes(const ModuleDamage& m, int rank, int gate) { return compensator_bytes(m.in, m.out, rank, gate); }

// Equal ranks on the chosen modules: the largest common rank step that fits, then single steps to the
// earliest modules while the budget allows.
std::vector<int> equal_ranks(const std::vector<const ModuleDamage*>& ms, const PlacementOptions& o, size_t budget) {
  std::vector<int> r(ms.size(), 0);
  auto total = [&] {
    size_t b = 0;
    for (size_t i = 0; i < ms.size(); ++i) b += r[i] ? ec_bytes(*ms[i], r[i], o.gate_width) : 0;
    return b;
  };
  for (int rank = o.rank_step; rank <= o.max_rank; rank += o.rank_step) {
    std::vector<int> save = r;
    std::fill(r.begin(), r.end(), rank);
    if (total() > budget) {
      r = save;
      break;
    }
  }
  for (size_t i = 0; i < ms.size(); ++i) {
    const int before = r[i];
    r[i] = before + o.rank_step;
    if (r[i] > o.max_rank || total() > budget) r[i] = before;
  }
  return r;
}

}  // namespace

Placement place_compensators(const Diagnosis& d, const PlacementOptions& o) {
  if (d.modules.empty()) fail("placement: the diagnosis has no modules");
  if (!(o.budget > 0)) fail("--budget must be positive, got {}", o.budget);
  if (o.model_bytes == 0) fail("placement: the quantized model's size is unknown");
  if (o.rank_step < 1 || o.min_rank < 1 || o.max_rank < o.min_rank) fail("placement: bad rank limits");
  Placement p;
  p.rule = o.rule;
  p.model_bytes = o.model_bytes;
  p.budget_bytes = size_t(std::floor(o.budget * double(o.model_bytes)));
  const size_t N = d.modules.size();
  int K = o.modules > 0 ? o.modules : int(std::lround(d.effective_modules));
  K = std::clamp(K, 1, int(N));

  std::vector<const ModuleDamage*> chosen;
  std::vector<int> ranks;
  if (o.rule == "uniform") {
    for (const auto& m : d.modules) chosen.push_back(&m);
    PlacementOptions u = o;
    u.rank_step = 1;
    ranks = equal_ranks(chosen, u, p.budget_bytes);
  } else if (o.rule == "top-damage" || o.rule == "random") {
    std::vector<const ModuleDamage*> all;
    for (const auto& m : d.modules) all.push_back(&m);
    if (o.rule == "top-damage") {
      std::stable_sort(all.begin(), all.end(), [](auto* a, auto* b) { return a->damage > b->damage; });
    } else {
      std::mt19937_64 rng(o.seed * 7919 + 17);
      std::shuffle(all.begin(), all.end(), rng);
    }
    chosen.assign(all.begin(), all.begin() + K);
    ranks = equal_ranks(chosen, o, p.budget_bytes);
  } else if (o.rule == "spear") {
    double mean_b = 0, mean_t = 0;
    for (const auto& m : d.modules) mean_b += double(m.bytes_per_rank) / N, mean_t += m.ec_us_per_rank / N;
    std::vector<std::pair<double, const ModuleDamage*>> scored;
    for (const auto& m : d.modules) {
      double cost = double(m.bytes_per_rank) / mean_b;
      if (mean_t > 0 && o.latency_weight > 0)
        cost = (1 - o.latency_weight) * cost + o.latency_weight * std::max(m.ec_us_per_rank / mean_t, 0.1);
      scored.push_back({m.damage / cost, &m});
    }
    std::stable_sort(scored.begin(), scored.end(), [](auto& a, auto& b) { return a.first > b.first; });
    for (int i = 0; i < K; ++i) chosen.push_back(scored[size_t(i)].second);
    double dsum = 0;
    for (auto* m : chosen) dsum += m->damage;
    ranks.assign(chosen.size(), 0);
    for (size_t i = 0; i < chosen.size(); ++i) {
      const double share = dsum > 0 ? chosen[i]->damage / dsum : 1.0 / chosen.size();
      const double r = share * double(p.budget_bytes) / double(ec_bytes(*chosen[i], 1, 0));
      int ri = int(std::floor(r / o.rank_step)) * o.rank_step;
      ranks[i] = std::clamp(ri, o.min_rank, o.max_rank);
    }
    auto total = [&] {
      size_t b = 0;
      for (size_t i = 0; i < chosen.size(); ++i) b += ranks[i] ? ec_bytes(*chosen[i], ranks[i], o.gate_width) : 0;
      return b;
    };
    // Minimum ranks may overshoot: drop the lowest-scored modules until it fits.
    while (total() > p.budget_bytes && chosen.size() > 1) chosen.pop_back(), ranks.pop_back();
    for (;;) {  // leftover budget: one rank step to the module with most damage per rank
      size_t best = chosen.size();
      double best_v = -1;
      for (size_t i = 0; i < chosen.size(); ++i) {
        if (ranks[i] + o.rank_step > o.max_rank) continue;
        const size_t extra = ec_bytes(*chosen[i], ranks[i] + o.rank_step, o.gate_width) - ec_bytes(*chosen[i], ranks[i], o.gate_width);
        if (total() + extra > p.budget_bytes) continue;
        const double v = chosen[i]->damage / double(ranks[i] + o.rank_step);
        if (v > best_v) best_v = v, best = i;
      }
      if (best == chosen.size()) break;
      ranks[best] += o.rank_step;
    }
  } else {
    fail("unknown placement rule '{}' (spear, uniform, top-damage, random)", o.rule);
  }
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (ranks[i] <= 0) continue;
    PlacedModule pm{chosen[i]->module, ranks[i], o.gate_width, ec_bytes(*chosen[i], ranks[i], o.gate_width), chosen[i]->damage};
    p.bytes += pm.bytes;
    p.modules.push_back(pm);
  }
  if (p.modules.empty() || p.bytes > p.budget_bytes)
    fail("a budget of {:.3g}% ({} bytes) is too small for even one rank-{} compensator with placement '{}'",
         o.budget * 100, p.budget_bytes, o.rank_step, o.rule);
  // Forward order, as the diagnosis lists modules.
  auto pos = [&](const std::string& n) {
    return std::find_if(d.modules.begin(), d.modules.end(), [&](const ModuleDamage& m) { return m.module == n; }) - d.modules.begin();
  };
  std::sort(p.modules.begin(), p.modules.end(), [&](auto& a, auto& b) { return pos(a.module) < pos(b.module); });
  return p;
}

nlohmann::json Placement::to_json() const {
  nlohmann::json mods = nlohmann::json::array();
  for (const auto& m : modules)
    mods.push_back({{"module", m.module}, {"rank", m.rank}, {"gate_width", m.gate_width}, {"bytes", m.bytes}, {"damage", m.damage}});
  return {{"rule", rule}, {"bytes", bytes}, {"budget_bytes", budget_bytes}, {"model_bytes", model_bytes},
          {"fraction", model_bytes ? double(bytes) / double(model_bytes) : 0.0}, {"modules", mods}};
}

std::string format_placement(const Placement& p) {
  std::string s = fmt::format("placement '{}': {} compensators, {} bytes = {:.3f}% of the quantized model ({} bytes; budget {})\n",
                              p.rule, p.modules.size(), p.bytes, 100.0 * double(p.bytes) / double(p.model_bytes),
                              p.model_bytes, p.budget_bytes);
  for (const auto& m : p.modules) s += fmt::format("  {:<34} rank {:>3}  gate {:>2}  {:>7} B\n", m.module, m.rank, m.gate_width, m.bytes);
  return s;
}

}  // namespace spear
