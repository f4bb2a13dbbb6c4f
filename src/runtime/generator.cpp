#include "runtime/generator.h"

#include <algorithm>
#include <chrono>
#include <limits>

#include "core/error.h"

namespace spear {

GenerateResult generate(Model& model, const std::vector<int32_t>& prompt_ids, int max_new_tokens,
                        const SamplingParams& sampling, const std::vector<int32_t>& eos_ids,
                        const std::function<bool(int32_t)>& on_token, bool record_margins) {
  const int ctx = model.config().max_position_embeddings;
  if (prompt_ids.empty()) fail("the prompt is empty (no tokens to condition on)");
  if (max_new_tokens < 0) fail("max tokens must be >= 0");
  if (int(prompt_ids.size()) >= ctx)
    fail("prompt of {} tokens does not fit the model's context of {} tokens", prompt_ids.size(), ctx);
  const int total = std::min<int>(ctx, int(prompt_ids.size()) + max_new_tokens);
  auto cache = model.make_kv_cache(1, total);
  Sampler sampler(sampling);
  GenerateResult r;
  r.finish_reason = "length";
  if (max_new_tokens == 0) return r;

  using clock = std::chrono::steady_clock;
  // Greedy decoding picks the token on the device (and replays a CUDA graph per step on the GPU): only the
  // token id crosses to the host, not the logits.
  const bool greedy = sampling.temperature <= 0.f;
  if (record_margins && !greedy) fail("logit margins are recorded for greedy decoding only (temperature 0)");
  std::vector<float> logits;
  std::vector<int32_t> next;
  auto step = [&](const Batch& b) {
    if (greedy && !record_margins) {
      next = model.forward_greedy(b, *cache);
      return;
    }
    logits = model.forward(b, *cache, LogitsMode::LastPerSeq);
    if (!record_margins) return;
    // The first largest logit wins (as the device's argmax), the margin is to the best of the others.
    int32_t best = 0;
    for (size_t i = 1; i < logits.size(); ++i)
      if (logits[i] > logits[size_t(best)]) best = int32_t(i);
    float second = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < logits.size(); ++i)
      if (int32_t(i) != best) second = std::max(second, logits[i]);
    next = {best};
    r.margins.push_back(logits[size_t(best)] - second);
  };
  auto t0 = clock::now();
  step(Batch::single(prompt_ids, 0));
  r.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  auto t1 = clock::now();
  int pos = int(prompt_ids.size());
  while (true) {
    int32_t tok = greedy ? next[0] : sampler.sample(logits);
    r.output_ids.push_back(tok);
    bool go_on = !on_token || on_token(tok);
    if (std::find(eos_ids.begin(), eos_ids.end(), tok) != eos_ids.end()) {
      r.finish_reason = "stop";
      break;
    }
    if (!go_on || int(r.output_ids.size()) >= max_new_tokens || pos >= total) break;
    step(Batch::single(std::span<const int32_t>(&tok, 1), pos));
    ++pos;
  }
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return r;
}

}  // namespace spear
