#pragma once
// Perplexity by the protocol of reference.json: the whole text tokenized as one string without BOS,
// non-overlapping windows of `ctx` tokens (remainder dropped), each window evaluated independently,
// every token of a window but its first scored.
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace spear {

struct PerplexityResult {
  double ppl = 0;
  double mean_nll = 0;
  double ppl_stderr = 0;  // delta-method standard error of ppl over scored tokens
  long tokens_scored = 0;
  int windows = 0;
  long text_tokens = 0;
  int ctx = 0;
  double seconds = 0;
};

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int ctx, int max_windows = 0);

// Negative log-likelihood of each next token for one row of logits: log Σ exp(l) − l[target], in double.
double token_nll(const float* logits, int vocab, int32_t target);

}  // namespace spear
