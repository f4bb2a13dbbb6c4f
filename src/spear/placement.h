#pragma once
// Where to put error compensators and at which rank, under a memory budget (DESIGN.md §3).
//
// The `spear` rule:
//  1. cost_m per unit of rank = the module's EC bytes per rank, normalised by their mean, blended with its
//     measured EC latency per rank (normalised the same way) by `latency_weight`; score_m = damage_m / cost_m.
//     latency_weight defaults to 0: measured times vary from run to run, and a placement that depends on
//     them would break "same seed, same package bytes"; at decode an EC's time is its bytes read anyway.
//  2. K = round(exp(H)) modules (the effective number of damaged modules; concentrated damage gives few
//     modules), taken in order of score.
//  3. The byte budget is split over the K modules in proportion to their damage, converted to ranks
//     (at least min_rank, multiples of rank_step), and what rounding leaves is handed out one rank step at
//     a time to the module with the highest damage per rank it already has.
// Baselines at the same budget: `uniform` (every module, equal rank, in steps of 1), `top-damage` (the K most damaged,
// equal rank), `random` (K seeded random modules, equal rank).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "spear/diagnose.h"

namespace spear {

struct PlacementOptions {
  std::string rule = "uniform";  // spear | uniform | top-damage | random (default chosen on valid.txt, README)
  double budget = 0.01;        // EC bytes as a fraction of the quantized model's bytes
  size_t model_bytes = 0;      // the quantized model's bytes (its package's tensors)
  int gate_width = 16;         // 0: static compensators
  double latency_weight = 0;   // 0..1: share of measured latency in the cost (see above)
  int min_rank = 2, max_rank = 256, rank_step = 2;
  int modules = 0;             // K override (0: round(exp(H)))
  uint64_t seed = 0;           // for `random`
};

struct PlacedModule {
  std::string module;
  int rank = 0, gate_width = 0;
  size_t bytes = 0;
  double damage = 0;
};

struct Placement {
  std::string rule;
  std::vector<PlacedModule> modules;  // forward order
  size_t bytes = 0, budget_bytes = 0, model_bytes = 0;
  nlohmann::json to_json() const;
};

std::vector<std::string> placement_rules();
Placement place_compensators(const Diagnosis& d, const PlacementOptions& o);
std::string format_placement(const Placement& p);

}  // namespace spear
