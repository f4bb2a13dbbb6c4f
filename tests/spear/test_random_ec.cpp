// Random-weight compensators for benchmarks (spear/random_ec.h): how many, on which linears, reproducible.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "spear/random_ec.h"
#include "test_util.h"

namespace spear {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

TEST(RandomCompensators, DensityCountsLinearsAndTheDrawIsSeeded) {
  CpuBackend be;
  auto m = Model::load(test::ref_model_dir(), be);
  const size_t n = m->linear_names().size();
  const auto ecs = attach_random_compensators(*m, 0.25, 8, 4, 1234);
  EXPECT_EQ(ecs.size(), size_t(std::lround(0.25 * double(n))));
  std::set<std::string> first;
  for (const auto& c : ecs) first.insert(c.module);
  detach_compensators(*m);
  std::set<std::string> again;
  for (const auto& c : attach_random_compensators(*m, 0.25, 8, 4, 1234)) again.insert(c.module);
  EXPECT_EQ(again, first);
}

TEST(RandomCompensators, KindsRestrictTheDraw) {
  CpuBackend be;
  auto m = Model::load(test::ref_model_dir(), be);
  const int layers = m->config().num_layers;
  // Every o_proj and down_proj, nothing else.
  const auto row_parallel = attach_random_compensators(*m, 1.0, 8, 0, 7, {"o_proj", "down_proj"});
  EXPECT_EQ(row_parallel.size(), size_t(2 * layers));
  for (const auto& c : row_parallel)
    EXPECT_TRUE(ends_with(c.module, ".o_proj") || ends_with(c.module, ".down_proj")) << c.module;
  detach_compensators(*m);
  // Density is a fraction of the matching linears.
  const auto half_q = attach_random_compensators(*m, 0.5, 8, 0, 7, {"q_proj"});
  EXPECT_EQ(half_q.size(), size_t(std::lround(0.5 * layers)));
  for (const auto& c : half_q) EXPECT_TRUE(ends_with(c.module, ".q_proj")) << c.module;
  detach_compensators(*m);
  // A kind must match a whole name component, and one that matches nothing is an error.
  EXPECT_THROW(attach_random_compensators(*m, 1.0, 8, 0, 7, {"proj"}), std::exception);
  EXPECT_THROW(attach_random_compensators(*m, 1.0, 8, 0, 7, {"qkv_proj"}), std::exception);
}

}  // namespace
}  // namespace spear
