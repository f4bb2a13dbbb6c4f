// Qwen2, Mistral and Llama-3-scaled tiny checkpoints against logits from the Hugging Face implementation
// (tools/make_model_fixtures.py): biases, sliding windows, explicit head_dim, GQA 4:1, untied heads,
// sharded files, llama3 RoPE scaling, and both config spellings.
#include <cmath>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/sampler.h"
#include "test_util.h"

namespace spear {

class ArchParity : public ::testing::TestWithParam<const char*> {};

TEST_P(ArchParity, LogitsMatchHuggingFace) {
  const std::string dir = test::fixture_dir(std::string("models/") + GetParam());
  CpuBackend be;
  auto model = Model::load(dir, be);
  std::ifstream in(dir + "/golden.json");
  auto g = nlohmann::json::parse(in);
  std::vector<int32_t> ids = g["ids"].get<std::vector<int32_t>>();
  auto argmax_ref = g["argmax"].get<std::vector<int32_t>>();
  auto cache = model->make_kv_cache(1, int(ids.size()));
  std::vector<float> logits = model->forward(Batch::single(ids, 0), *cache, LogitsMode::All);
  std::vector<float> want = SafetensorsFile(dir + "/golden_logits.safetensors").find("logits")->to_f32();
  ASSERT_EQ(logits.size(), want.size());
  float max_err = 0, max_ref = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    max_err = std::max(max_err, std::fabs(logits[i] - want[i]));
    max_ref = std::max(max_ref, std::fabs(want[i]));
  }
  const int V = model->config().vocab_size;
  for (size_t t = 0; t < ids.size(); ++t)
    EXPECT_EQ(argmax(std::span<const float>(logits.data() + t * V, size_t(V))), argmax_ref[t]) << "position " << t;
  EXPECT_LE(max_err, 2e-3f) << "largest |golden logit| " << max_ref;
  std::printf("%s: max |logit - golden| = %.3g (logits up to %.1f)\n", GetParam(), max_err, max_ref);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ArchParity, ::testing::Values("qwen2-tiny", "mistral-tiny", "llama3-scaled-tiny"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& c : s)
                             if (c == '-') c = '_';
                           return s;
                         });

}  // namespace spear
