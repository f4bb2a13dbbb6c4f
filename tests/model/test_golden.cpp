// The reference model against the Hugging Face implementation's golden outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/generator.h"
#include "runtime/sampler.h"
#include "test_util.h"

namespace spear {

namespace {
nlohmann::json golden() {
  std::ifstream in(test::ref_model_dir() + "/golden.json");
  return nlohmann::json::parse(in);
}
}  // namespace

TEST(Golden, LogitsMatchHuggingFace) {
  SPEAR_REQUIRE_SHARED();
  CpuBackend be;
  auto model = Model::load(test::ref_model_dir(), be);
  auto g = golden();
  std::vector<int32_t> ids = g["ids"].get<std::vector<int32_t>>();
  ASSERT_EQ(ids.size(), 128u);
  auto cache = model->make_kv_cache(1, 128);
  std::vector<float> logits = model->forward(Batch::single(ids, 0), *cache, LogitsMode::All);
  SafetensorsFile ref(test::shared_dir() + "/models/ref-llama-23m/golden_logits.safetensors");
  std::vector<float> want = ref.find("logits")->to_f32();
  ASSERT_EQ(logits.size(), want.size());
  const int V = model->config().vocab_size;
  auto argmax_ref = g["argmax"].get<std::vector<int32_t>>();
  float max_err = 0;
  for (size_t i = 0; i < logits.size(); ++i) max_err = std::max(max_err, std::fabs(logits[i] - want[i]));
  int argmax_mismatch = 0;
  for (int t = 0; t < 128; ++t)
    argmax_mismatch +=
        argmax(std::span<const float>(logits.data() + size_t(t) * V, size_t(V))) != argmax_ref[size_t(t)];
  EXPECT_EQ(argmax_mismatch, 0);
  EXPECT_LE(max_err, 2e-3f);
  RecordProperty("max_abs_logit_error", std::to_string(max_err));
  std::printf("golden logits: max |logit - golden| = %.3g over 128 x %d\n", max_err, V);
}

TEST(Golden, GreedyGenerationMatchesHuggingFace) {
  CpuBackend be;
  auto model = Model::load(test::ref_model_dir(), be);
  auto g = golden()["greedy"];
  std::vector<int32_t> all = g["ids"].get<std::vector<int32_t>>();
  // The golden prompt ids are the first 4 ("The meaning of" with BOS); the rest are the 32 generated.
  std::vector<int32_t> prompt(all.begin(), all.begin() + 4);
  std::vector<int32_t> want(all.begin() + 4, all.end());
  ASSERT_EQ(want.size(), 32u);
  GenerateResult r = generate(*model, prompt, 32, SamplingParams{}, {1});
  EXPECT_EQ(r.output_ids, want);
  EXPECT_TRUE(r.margins.empty());
}

// With record_margins the same tokens come out, and each step's margin is its logits' top-1 minus top-2, checked
// against a separate forward pass over the prompt and the tokens before that step.
TEST(Golden, GreedyMarginsAreTopTwoGaps) {
  CpuBackend be;
  auto model = Model::load(test::ref_model_dir(), be);
  std::vector<int32_t> all = golden()["greedy"]["ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> prompt(all.begin(), all.begin() + 4);
  GenerateResult r = generate(*model, prompt, 12, SamplingParams{}, {1}, {}, /*record_margins=*/true);
  ASSERT_EQ(r.output_ids, std::vector<int32_t>(all.begin() + 4, all.begin() + 16));
  ASSERT_EQ(r.margins.size(), r.output_ids.size());
  for (size_t k : {size_t(0), size_t(5), size_t(11)}) {
    std::vector<int32_t> feed = prompt;
    feed.insert(feed.end(), r.output_ids.begin(), r.output_ids.begin() + std::ptrdiff_t(k));
    auto cache = model->make_kv_cache(1, 64);
    std::vector<float> logits = model->forward(Batch::single(feed, 0), *cache, LogitsMode::LastPerSeq);
    std::vector<float> sorted = logits;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    EXPECT_EQ(logits[size_t(r.output_ids[k])], sorted[0]) << "step " << k;
    EXPECT_NEAR(r.margins[k], sorted[0] - sorted[1], 1e-4f) << "step " << k;
    EXPECT_GT(r.margins[k], 0.f) << "step " << k;
  }
  SamplingParams sampled;
  sampled.temperature = 0.7f;
  EXPECT_THROW(generate(*model, prompt, 4, sampled, {1}, {}, true), Error);
}

}  // namespace spear
