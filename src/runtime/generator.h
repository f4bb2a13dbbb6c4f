#pragma once
// Single-sequence generation: prefill the prompt, then decode token by token over the KV cache.
#include <functional>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/sampler.h"

namespace spear {

struct GenerateResult {
  std::vector<int32_t> output_ids;  // new tokens only
  std::string finish_reason;        // "stop" (EOS) or "length"
  double prefill_seconds = 0, decode_seconds = 0;
  // With record_margins: per new token, greedy only, the largest logit minus the second largest (how far the
  // step was from a tie; two runs whose arithmetic differs slightly can only part where this is small).
  std::vector<float> margins;
};

// on_token is called after each new token (for streaming); return false to stop early. record_margins (greedy
// only) brings every step's logits to the host to fill GenerateResult::margins: slower, and no CUDA graphs.
GenerateResult generate(Model& model, const std::vector<int32_t>& prompt_ids, int max_new_tokens,
                        const SamplingParams& sampling, const std::vector<int32_t>& eos_ids,
                        const std::function<bool(int32_t)>& on_token = {}, bool record_margins = false);

}  // namespace spear
