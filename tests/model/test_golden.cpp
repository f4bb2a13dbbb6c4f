// The reference model against the Hugging Face implementation's golden outputs.
#include <cmath>
#include <fstream>

#include <gtest/gtest.h>
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
    argmax_mismatch += argmax(std::span<const float>(logits.data() + size_t(t) * V, size_t(V))) != argmax_ref[size_t(t)];
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
}

}  // namespace spear
