// Perplexity by reference.json's protocol on the full evaluation files (the numbers the issue asks for).
#include <cmath>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "eval/perplexity.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace spear {

TEST(Perplexity, TokenNll) {
  std::vector<float> l = {0.f, 0.f, 0.f, 0.f};
  EXPECT_NEAR(token_nll(l.data(), 4, 2), std::log(4.0), 1e-12);
  std::vector<float> m = {1000.f, 0.f};  // stable for large logits
  EXPECT_NEAR(token_nll(m.data(), 2, 0), 0.0, 1e-12);
  EXPECT_NEAR(token_nll(m.data(), 2, 1), 1000.0, 1e-9);
}

class ReferencePerplexity : public ::testing::TestWithParam<const char*> {};

TEST_P(ReferencePerplexity, MatchesReferenceJson) {
  SPEAR_REQUIRE_SHARED();
  const std::string split = GetParam();
  auto ref = nlohmann::json::parse(test::read_file(test::ref_model_dir() + "/reference.json"));
  const double want = ref[split]["ppl_fp32"].get<double>();
  const long want_tokens = ref[split]["tokens"].get<long>();
  CpuBackend be;
  auto model = Model::load(test::ref_model_dir(), be);
  Tokenizer tok = Tokenizer::from_dir(test::ref_model_dir());
  std::vector<int32_t> ids = tok.encode(test::read_file(test::shared_dir() + "/data/" + split), false);
  EXPECT_EQ(long(ids.size()), want_tokens);
  PerplexityResult r = perplexity(*model, ids, 512);
  EXPECT_EQ(r.windows, int(ids.size() / 512));
  EXPECT_EQ(r.tokens_scored, long(r.windows) * 511);
  EXPECT_NEAR(r.ppl, want, want * 5e-4) << split;
  std::printf("%s: ppl %.4f (reference %.4f, rel. diff %.2e), %ld tokens scored in %.1f s\n", split.c_str(), r.ppl,
              want, (r.ppl - want) / want, r.tokens_scored, r.seconds);
}

INSTANTIATE_TEST_SUITE_P(Splits, ReferencePerplexity, ::testing::Values("test.txt", "valid.txt"),
                         [](const auto& info) { return std::string(info.param) == "test.txt" ? "test" : "valid"; });

}  // namespace spear
