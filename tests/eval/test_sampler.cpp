#include <map>

#include <gtest/gtest.h>

#include "runtime/sampler.h"
#include "test_util.h"

namespace spear {

TEST(Sampler, GreedyIsArgmax) {
  std::vector<float> l = {0.1f, 3.f, 2.f, 3.f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(l), 1);  // first maximum, like torch.argmax
}

TEST(Sampler, TopKAndTopPRestrictSupport) {
  std::vector<float> l = {5.f, 4.f, 3.f, 0.f, -1.f};
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  p.seed = 3;
  Sampler s(p);
  std::map<int, int> seen;
  for (int i = 0; i < 2000; ++i) seen[s.sample(l)]++;
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[0], seen[1]);
  // softmax(5,4) = 0.731 / 0.269
  EXPECT_NEAR(seen[0] / 2000.0, 0.731, 0.04);

  SamplingParams q;
  q.temperature = 1.f;
  q.top_p = 0.5f;  // the first token alone has 0.66 of the mass
  Sampler s2(q);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(s2.sample(l), 0);
}

TEST(Sampler, SeededIsDeterministic) {
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = float(i % 7);
  SamplingParams p;
  p.temperature = 0.8f;
  p.seed = 42;
  Sampler a(p), b(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.sample(l), b.sample(l));
}

TEST(Sampler, RejectsBadParams) {
  SamplingParams p;
  p.top_p = 0.f;
  EXPECT_SPEAR_ERROR(Sampler{p}, "top_p");
  p.top_p = 1.f;
  p.temperature = -1.f;
  EXPECT_SPEAR_ERROR(Sampler{p}, "temperature");
}

}  // namespace spear
