#include <random>

#include <gtest/gtest.h>

#include "spear/compensator.h"
#include "test_util.h"

namespace spear {
namespace {

Compensator random_ec(int in, int out, int r, int h, uint64_t seed) {
  Compensator c;
  c.module = "test";
  c.resize(in, out, r, h);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.3f);
  for (auto* v : {&c.A, &c.B, &c.W1, &c.b1, &c.W2, &c.b2})
    for (float& x : *v) x = nd(rng);
  return c;
}

TEST(Compensator, FastPathEqualsNaiveReference) {
  for (int h : {0, 3, 16})
    for (int T : {1, 5, 130}) {
      Compensator c = random_ec(37, 29, 7, h, 11 + h + T);
      std::mt19937_64 rng(T);
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> x(size_t(T) * 37), y1(size_t(T) * 29), y2;
      for (float& v : x) v = nd(rng);
      for (float& v : y1) v = nd(rng);
      y2 = y1;
      compensator_apply(c, x.data(), T, y1.data());
      compensator_apply_reference(c, x.data(), T, y2.data());
      double worst = 0;
      for (size_t i = 0; i < y1.size(); ++i) worst = std::max(worst, double(std::abs(y1[i] - y2[i])));
      EXPECT_LT(worst, 2e-5) << "h=" << h << " T=" << T;
    }
}

TEST(Compensator, GateAtInitGivesExactlyTheStaticResult) {
  Compensator gated = random_ec(64, 48, 8, 0, 3);
  Compensator stat = gated;
  gated.init_gate(16, 0.5f, 7);
  EXPECT_EQ(gated.W1.size(), 16u * 8u);
  std::vector<float> x(size_t(9) * 64, 0.25f), y1(size_t(9) * 48, 0.f), y2(size_t(9) * 48, 0.f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(double(i)));
  compensator_apply(gated, x.data(), 9, y1.data());
  compensator_apply(stat, x.data(), 9, y2.data());
  for (size_t i = 0; i < y1.size(); ++i) ASSERT_EQ(y1[i], y2[i]) << i;
}

TEST(Compensator, BytesCountEveryBf16Parameter) {
  EXPECT_EQ(compensator_bytes(512, 1536, 8, 0), 2u * (8 * 512 + 1536 * 8));
  EXPECT_EQ(compensator_bytes(512, 512, 8, 16), 2u * (8 * 512 + 512 * 8 + 16 * 8 + 16 + 8 * 16 + 8));
  Compensator c = random_ec(10, 12, 3, 4, 1);
  EXPECT_EQ(c.bytes(), compensator_bytes(10, 12, 3, 4));
  c.A.pop_back();
  EXPECT_SPEAR_ERROR(c.validate(), "A has");
}

}  // namespace
}  // namespace spear
