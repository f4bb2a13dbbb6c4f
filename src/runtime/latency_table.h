#pragma once
// Forward-pass time by the number of tokens in an iteration, measured on the served model (with its error
// compensators, so the table is EC-aware by construction), and the prediction the SLO scheduler uses: piecewise
// linear between measured token counts, linear beyond the last one. `spear tune` writes it as JSON.
#include <string>
#include <vector>

#include "model/model.h"

namespace spear {

struct LatencyTable {
  std::vector<int> tokens;  // increasing
  std::vector<double> ms;   // forward time of one iteration with that many tokens
  std::string device, model;

  double predict_ms(int n_tokens) const;
  // The largest c in [0, max_chunk] with predict_ms(fixed + c) <= budget_ms (0 when even c = 0 is over).
  int largest_chunk(int fixed_tokens, int max_chunk, double budget_ms) const;

  // Times Model::forward on one sequence of each token count (median of reps after a warm-up), then fits the
  // closest non-decreasing curve (pool adjacent violators; load() does the same).
  static LatencyTable measure(Model& model, const std::vector<int>& token_counts, int reps);
  void save(const std::string& path) const;
  static LatencyTable load(const std::string& path);  // throws spear::Error on a bad file
};

}  // namespace spear
