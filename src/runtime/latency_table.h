#pragma once
// Forward-pass time by the number of tokens in an iteration, measured on the served model (with its error
// compensators, so the table is EC-aware by construction), and the prediction the SLO scheduler uses: piecewise
// linear between measured token counts, linear beyond the last one. `spear tune` writes it as JSON.
#include <string>
#include <vector>

#include "model/model.h"

namespace spear {

// One sequence's part of an iteration: n new tokens after pos0 cached ones.
struct SeqWork {
  int n = 0, pos0 = 0;
};

struct LatencyTable {
  std::vector<int> tokens;  // increasing
  std::vector<double> ms;   // forward time of one iteration of one fresh sequence (pos0 = 0) with that many tokens
  std::string device, model;
  // The batch-composition terms (fitted by measure_batches; 0 = the tokens table alone): ms per attention pair
  // beyond those of the table's own fresh sequence, and ms per extra sequence in the batch.
  double ms_per_kpair = 0, ms_per_seq = 0;  // kpair = 1000 (query token, cached key) pairs

  double predict_ms(int n_tokens) const;
  // An iteration of these sequences: the table at the total token count, plus the attention over cached
  // context (each new token attends to pos0 + its index + 1 keys; the table's fresh sequence of the same total
  // already has N (N + 1) / 2) and the per-sequence cost. Non-decreasing in every n and pos0.
  double predict_ms(const std::vector<SeqWork>& batch) const;
  // The largest c in [0, max_chunk] with predict_ms(fixed + c) <= budget_ms (0 when even c = 0 is over).
  int largest_chunk(int fixed_tokens, int max_chunk, double budget_ms) const;
  // The same over a composition: `fixed` (the decodes) plus c prompt tokens handed to `prefill` in order (each
  // up to its n, at its pos0), the largest c <= max_chunk that meets the budget.
  int largest_chunk(const std::vector<SeqWork>& fixed, const std::vector<SeqWork>& prefill, int max_chunk,
                    double budget_ms) const;

  // Times Model::forward on one sequence of each token count (median of reps after a warm-up), then fits the
  // closest non-decreasing curve (pool adjacent violators; load() does the same).
  static LatencyTable measure(Model& model, const std::vector<int>& token_counts, int reps);
  // Then the composition terms: decode steps of B sequences at context C (and with a prompt chunk beside
  // them) are timed and ms_per_kpair, ms_per_seq fitted to what the table alone leaves (non-negative least
  // squares). Sizes are clamped to the model's context.
  void measure_batches(Model& model, int reps, int max_seqs = 16, int max_context = 512);
  void save(const std::string& path) const;
  static LatencyTable load(const std::string& path);  // throws spear::Error on a bad file
};

// The factor an SLO scheduler multiplies the table's predictions by, learned online from the iterations it
// filled (prompt tokens beside decodes). A mean of measured / predicted meets the SLO only on average, and an
// iteration packed to the SLO then runs over about half the time; the tail is what an ITL percentile sees. So
// the factor is the `quantile` of measured / predicted over the last kWindow iterations predicted at half the
// SLO or more (the ones that can break it), once kMinSamples of them are in. Ratios are clamped to [0.25, 4].
//
// One factor per size class of iteration (total tokens 1, 2, 3-4, 5-8, ..., 1025 and more): the table's error
// depends on the size (the GPU's kernels change at tile boundaries), and one factor for every size, learned where
// the scheduler happened to pack, held it there. On the H200 at 60% ECs and a 16 ms SLO, iterations of 9-16 tokens
// ran 1.2-1.6x the table, the one factor rose to 1.66, the chunk search then only found room in that same class,
// and prompts starved (TTFT p50 20 s; bench/results/serve-h200-calib). Until a class has kMinSamples of its own
// its factor is the slowest of them (one slow iteration corrects it at once: exploring a class at the running mean
// let 20 iterations of each new class run over), and a class never seen starts from the table itself, or the
// running mean of every class where that is slower.
class SloCalibrator {
 public:
  static constexpr size_t kWindow = 256, kMinSamples = 20;
  static constexpr int kClasses = 12;
  explicit SloCalibrator(double quantile = 0.99) : quantile_(quantile) {}
  static int size_class(int tokens);  // 0 for 1 token, then ceil(log2(tokens)), at most kClasses - 1
  static int class_max_tokens(int c);  // the largest token count of class c (INT_MAX for the last)
  // One filled iteration of `tokens` tokens: its raw prediction (before the factor), the measured time and the SLO.
  void add(int tokens, double predicted_ms, double measured_ms, double slo_ms);
  double scale(int tokens) const;
  size_t samples() const;            // near the SLO, every class
  size_t samples(int tokens) const;  // of the class of `tokens`

 private:
  struct Window {
    std::vector<double> ratios;  // ring of the last kWindow ratios near the SLO
    size_t next = 0;
    double quantile = 1;  // of ratios, once kMinSamples are in
  };
  double quantile_, mean_ = 1;
  Window classes_[kClasses];
};

// The largest prompt chunk (0..max_chunk) beside `decodes` whose iteration, predicted by the table and scaled by
// the calibration of its own size class, meets slo_ms: each class from the largest down, a binary search within it.
int slo_chunk(const LatencyTable& table, const SloCalibrator& cal, const std::vector<SeqWork>& decodes,
              const std::vector<SeqWork>& prefill, int max_chunk, double slo_ms);

}  // namespace spear
