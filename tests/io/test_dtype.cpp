#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "core/dtype.h"

namespace spear {

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16RoundTrip) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-60000.f, 60000.f);
  for (int i = 0; i < 10000; ++i) {
    float x = u(rng);
    float y = f16_to_f32(f32_to_f16(x));
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * 1e-3f + 1e-7f) << x;
    EXPECT_EQ(f32_to_f16(y), f32_to_f16(x));  // idempotent
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST(DType, Names) {
  DType t;
  ASSERT_TRUE(dtype_from_name("BF16", &t));
  EXPECT_EQ(t, DType::BF16);
  EXPECT_EQ(dtype_size(t), 2u);
  EXPECT_FALSE(dtype_from_name("F8_E4M3X", &t));
}

}  // namespace spear
