// The KV cache and batching must not change the function: incremental decoding and multi-sequence batches
// give the logits of one full forward pass.
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "test_util.h"

namespace spear {

namespace {
float max_diff(const float* a, const float* b, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}
}  // namespace

class ForwardConsistency : public ::testing::TestWithParam<const char*> {};

TEST_P(ForwardConsistency, IncrementalAndBatchedEqualFull) {
  const std::string dir = std::string(GetParam()) == "ref" ? test::ref_model_dir()
                                                           : test::fixture_dir(std::string("models/") + GetParam());
  CpuBackend be;
  auto model = Model::load(dir, be);
  const int V = model->config().vocab_size;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> tok(2, V - 1);
  const int n = 37;
  std::vector<int32_t> ids(n);
  for (auto& t : ids) t = tok(rng);

  auto full_cache = model->make_kv_cache(1, n);
  auto full = model->forward(Batch::single(ids, 0), *full_cache, LogitsMode::All);

  // Prefill 20, then chunks of 1 and 16.
  auto cache = model->make_kv_cache(1, n);
  std::span<const int32_t> all(ids);
  auto a = model->forward(Batch::single(all.subspan(0, 20), 0), *cache, LogitsMode::All);
  EXPECT_LE(max_diff(a.data(), full.data(), a.size()), 1e-4f);
  auto b = model->forward(Batch::single(all.subspan(20, 1), 20), *cache, LogitsMode::LastPerSeq);
  EXPECT_LE(max_diff(b.data(), full.data() + size_t(20) * V, size_t(V)), 1e-4f);
  auto c = model->forward(Batch::single(all.subspan(21, 16), 21), *cache, LogitsMode::All);
  EXPECT_LE(max_diff(c.data(), full.data() + size_t(21) * V, c.size()), 1e-4f);

  // Two sequences in one batch, different positions and slots.
  auto cache2 = model->make_kv_cache(2, n);
  model->forward(Batch::single(all.subspan(0, 30), 0), *cache2, LogitsMode::None);
  Batch batch;
  batch.tokens.assign(ids.begin(), ids.begin() + 12);  // sequence in slot 1, fresh
  batch.tokens.push_back(ids[30]);                     // sequence in slot 0 continues at 30
  batch.seqs = {{0, 12, 0, 1}, {12, 1, 30, 0}};
  auto d = model->forward(batch, *cache2, LogitsMode::LastPerSeq);
  EXPECT_LE(max_diff(d.data(), full.data() + size_t(11) * V, size_t(V)), 1e-4f);
  EXPECT_LE(max_diff(d.data() + V, full.data() + size_t(30) * V, size_t(V)), 1e-4f);
}

TEST(ForwardBad, RejectsBadInput) {
  CpuBackend be;
  auto model = Model::load(test::fixture_dir("models/qwen2-tiny"), be);
  auto cache = model->make_kv_cache(1, 8);
  std::vector<int32_t> ids = {1, 2, 3};
  std::vector<int32_t> bad = {1, 99999};
  EXPECT_SPEAR_ERROR(model->forward(Batch::single(bad, 0), *cache, LogitsMode::All), "outside the vocabulary");
  EXPECT_SPEAR_ERROR(model->forward(Batch::single(ids, 6), *cache, LogitsMode::All), "exceeds the context capacity");
}

INSTANTIATE_TEST_SUITE_P(Models, ForwardConsistency, ::testing::Values("ref", "qwen2-tiny", "mistral-tiny"));

}  // namespace spear
