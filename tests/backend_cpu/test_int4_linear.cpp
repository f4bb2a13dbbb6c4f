// Quantized CPU linear layers: packing round trips and every kernel variant against the dequantizing reference.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cpu/int4_linear.h"
#include "core/error.h"
#include "test_util.h"

namespace spear {
namespace {

std::vector<float> random_vec(std::mt19937& rng, size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

QuantizedMatrix random_quantized(std::mt19937& rng, int out, int in, int bits, int group_size) {
  std::vector<float> w = random_vec(rng, size_t(out) * in);
  QuantParams p;
  p.bits = bits;
  p.group_size = group_size;
  return rtn_quantize(w.data(), out, in, p);
}

// Restores automatic kernel selection when a test ends, also on failure.
struct KernelGuard {
  ~KernelGuard() { force_quant_kernel(nullptr); }
};

TEST(Int4Pack, RoundTripExactAllBits) {
  std::mt19937 rng(7);
  for (int bits = 2; bits <= 8; ++bits)
    for (int in : {1, 3, 31, 32, 33, 129})
      for (int gs : {-1, 5, 32, 48}) {
        QuantizedMatrix m = random_quantized(rng, 7, in, bits, gs);
        PackedQuantWeights p = pack_quantized(m);
        EXPECT_EQ(p.container_bits, bits <= 4 ? 4 : 8);
        EXPECT_EQ(p.qweight.size(), size_t(7) * (bits <= 4 ? size_t(in + 1) / 2 : size_t(in)));
        QuantizedMatrix u = unpack_quantized(p);
        ASSERT_EQ(u.out, m.out);
        ASSERT_EQ(u.in, m.in);
        EXPECT_EQ(u.params.bits, bits);
        EXPECT_EQ(u.params.groups(in), m.params.groups(in));
        EXPECT_EQ(u.q, m.q) << "bits " << bits << " in " << in << " gs " << gs;
        EXPECT_EQ(u.scales, m.scales);
        EXPECT_EQ(u.zeros, m.zeros);
        // The codes actually use the whole range (the round trip is not trivially of zeros).
        if (in >= 31) {
          EXPECT_EQ(*std::max_element(m.q.begin(), m.q.end()), (1 << bits) - 1);
        }
      }
}

TEST(Int4Pack, CanonicalNibbleOrder) {
  QuantizedMatrix m;
  m.out = 1;
  m.in = 3;
  m.params.bits = 4;
  m.q = {0x3, 0xA, 0xF};
  m.scales = {1.f};
  m.zeros = {0};
  PackedQuantWeights p = pack_quantized(m);
  ASSERT_EQ(p.qweight.size(), 2u);
  EXPECT_EQ(p.qweight[0], 0xA3);  // column 0 low nibble, column 1 high nibble
  EXPECT_EQ(p.qweight[1], 0x0F);  // odd `in`: last high nibble 0
}

TEST(Int4Pack, RejectsOutOfRangeCodes) {
  QuantizedMatrix m;
  m.out = 1;
  m.in = 2;
  m.params.bits = 3;
  m.q = {1, 9};
  m.scales = {1.f};
  m.zeros = {0};
  EXPECT_SPEAR_ERROR(pack_quantized(m), "exceeds 3 bits");
}

TEST(Int4Linear, ReferenceMatchesDequantizedMatrix) {
  std::mt19937 rng(3);
  QuantizedMatrix m = random_quantized(rng, 5, 37, 4, 16);
  PackedQuantWeights p = pack_quantized(m);
  std::vector<float> x = random_vec(rng, 2 * 37), bias = random_vec(rng, 5), y(2 * 5);
  quant_linear_reference(x.data(), 2, p, bias.data(), y.data());
  for (int t = 0; t < 2; ++t)
    for (int r = 0; r < 5; ++r) {
      double acc = bias[r];
      for (int c = 0; c < 37; ++c) acc += double(m.dequant(r, c)) * x[t * 37 + c];
      EXPECT_NEAR(y[t * 5 + r], acc, 1e-5);
    }
}

TEST(Int4Linear, KernelSelection) {
  KernelGuard guard;
  auto avail = quant_kernels_available();
  ASSERT_FALSE(avail.empty());
  EXPECT_EQ(avail.back(), "scalar");
  EXPECT_EQ(std::string(quant_kernel_name()), avail.front());
  for (const auto& k : avail) {
    force_quant_kernel(k.c_str());
    EXPECT_EQ(std::string(quant_kernel_name()), k);
  }
  EXPECT_SPEAR_ERROR(force_quant_kernel("sse9"), "unknown quant kernel");
  if (!__builtin_cpu_supports("avx512f")) EXPECT_SPEAR_ERROR(force_quant_kernel("avx512"), "not supported");
}

struct Case {
  int out, in, T, gs, bits;
  bool bias;
};

// max |y - ref| / max |ref| for one case with the current kernel.
double run_case(std::mt19937& rng, const Case& c) {
  QuantizedMatrix m = random_quantized(rng, c.out, c.in, c.bits, c.gs);
  PackedQuantWeights p = pack_quantized(m);
  CpuQuantWeights w = prepare_cpu_quant(p);
  std::vector<float> x = random_vec(rng, size_t(c.T) * c.in), bias = random_vec(rng, c.out);
  std::vector<float> y(size_t(c.T) * c.out, NAN), ref(y.size());
  quant_linear_f32(x.data(), c.T, w, c.bias ? bias.data() : nullptr, y.data());
  quant_linear_reference(x.data(), c.T, p, c.bias ? bias.data() : nullptr, ref.data());
  double maxdiff = 0, maxref = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isfinite(y[i])) return INFINITY;
    maxdiff = std::max(maxdiff, double(std::fabs(y[i] - ref[i])));
    maxref = std::max(maxref, double(std::fabs(ref[i])));
  }
  return maxdiff / std::max(maxref, 1e-30);
}

// Every (out, in, T) of the grid, with group size, bits and bias cycling through their values, for each
// kernel variant this CPU supports; plus the full cross product of group sizes x bits on a few shapes.
TEST(Int4Linear, AllKernelsMatchReference) {
  KernelGuard guard;
  const int outs[] = {1, 7, 64, 257, 512};
  const int ins[] = {1, 3, 31, 64, 129, 512, 1536};
  const int Ts[] = {1, 2, 3, 4, 8, 13, 17, 64, 200};
  const int gss[] = {-1, 32, 64, 128, 48, 20, 5};  // 48, 20, 5 do not divide most `in`; 20 and 5 not of 16
  const int bitss[] = {2, 3, 4, 8, 5};
  std::vector<Case> cases;
  int i = 0;
  for (int out : outs)
    for (int in : ins)
      for (int T : Ts) {
        // Bound the reference's cost on the largest shapes.
        if (double(out) * in * T > 512.0 * 1536 * 64 && (i % 3)) {
          ++i;
          continue;
        }
        cases.push_back({out, in, T, gss[i % 7], bitss[(i / 7) % 5], (i % 2) == 0});
        ++i;
      }
  for (int gs : gss)
    for (int bits : bitss)
      for (int T : {1, 3, 8, 11, 17})
        for (auto [out, in] : {std::pair{37, 200}, std::pair{64, 129}}) cases.push_back({out, in, T, gs, bits, T != 3});

  int checked = 0;
  for (const auto& k : quant_kernels_available()) {
    force_quant_kernel(k.c_str());
    std::mt19937 rng(1234);
    double worst = 0;
    for (const Case& c : cases) {
      const double err = run_case(rng, c);
      worst = std::max(worst, err);
      ASSERT_LE(err, 1e-5) << "kernel " << k << " out " << c.out << " in " << c.in << " T " << c.T << " gs " << c.gs
                           << " bits " << c.bits << " bias " << c.bias;
      ++checked;
    }
    std::printf("kernel %-6s: %zu cases, worst relative max|diff| %.2e\n", k.c_str(), cases.size(), worst);
  }
  EXPECT_GE(checked, int(cases.size()));
}

// A constant-zero weight matrix gives exactly the bias; a single known code gives a known output.
TEST(Int4Linear, KnownValues) {
  KernelGuard guard;
  for (const auto& k : quant_kernels_available()) {
    force_quant_kernel(k.c_str());
    for (int T : {1, 5, 40}) {
      QuantizedMatrix m;
      m.out = 3;
      m.in = 70;
      m.params.bits = 4;
      m.params.group_size = 32;  // 3 groups, last partial
      m.q.assign(size_t(3) * 70, 2);
      m.scales = {0.5f, 0.25f, 1.f, 1.f, 1.f, 1.f, 2.f, 2.f, 2.f};
      m.zeros = {1, 2, 0, 2, 2, 2, 2, 2, 3};
      // row 0: w = 0.5 for cols 0..31, 0 for 32..63, 2 for 64..69; row 1: 0; row 2: 0 except cols 64..69 = -2.
      std::vector<float> x(size_t(T) * 70, 1.f), bias = {0.f, 3.f, -1.f}, y(size_t(T) * 3);
      quant_linear_f32(x.data(), T, prepare_cpu_quant(pack_quantized(m)), bias.data(), y.data());
      for (int t = 0; t < T; ++t) {
        EXPECT_FLOAT_EQ(y[t * 3 + 0], 0.5f * 32 + 2.f * 6) << k << " T " << T;
        EXPECT_FLOAT_EQ(y[t * 3 + 1], 3.f) << k << " T " << T;
        EXPECT_FLOAT_EQ(y[t * 3 + 2], -1.f - 2.f * 6) << k << " T " << T;
      }
    }
  }
}

TEST(Int4Linear, WeightBytes) {
  std::mt19937 rng(5);
  CpuQuantWeights w = prepare_cpu_quant(pack_quantized(random_quantized(rng, 64, 512, 4, 128)));
  EXPECT_EQ(w.q.size(), size_t(64) * 256);
  EXPECT_EQ(quant_weight_bytes(w), size_t(64) * 256 + size_t(64) * 4 * (4 + 4 + 4));
}

}  // namespace
}  // namespace spear
