// The gate / up pair's ECs added by the SwiGLU launch (issue 6; swiglu_ec.h): the grouped projection launch
// (w4a16_gemm_ec_project_group) leaves the plain grouped GEMM's outputs bit for bit and g ⊙ z against a double-precision
// A·x through the compensator's own gate; the SwiGLU launch against the naive path's roundings computed on the host.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/swiglu_ec.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/dtype.h"
#include "spear/compensator.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

#define SPEAR_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

// g ⊙ z of one token in double precision from the bf16 A and x the kernel reads (the compensator's A is bf16-exact).
std::vector<double> gated_z(const Compensator& c, const std::vector<uint16_t>& x, int t) {
  std::vector<double> z(size_t(c.rank), 0.0);
  for (int j = 0; j < c.rank; ++j)
    for (int i = 0; i < c.in; ++i) z[size_t(j)] += double(c.A[size_t(j) * c.in + i]) * bf16_to_f32(x[size_t(t) * c.in + i]);
  std::vector<float> zf(z.begin(), z.end()), g(size_t(c.rank));
  compensator_gate(c, zf.data(), g.data());
  for (int j = 0; j < c.rank; ++j) z[size_t(j)] *= g[size_t(j)];
  return z;
}

}  // namespace

// Gate / up shaped groups with ECs on both members or one, gated and static, 1-32 tokens, under the bulk-copy kernel
// (whatever the number of waves), forced register-ring plans and the modelled plan: the outputs equal the plain grouped
// launch under the same plan, g ⊙ z is within 1e-4 of the double-precision value, and a second launch gives the same
// bits (the EC CTAs' ticket and epoch back in order).
TEST(CudaEc, ProjectGroupGivesPlainOutputsAndGatedAx) {
  SPEAR_REQUIRE_GPU();
  struct Case {
    int n, k, group, m, rank, gate;
    bool ec0, ec1;
  };
  const Case cases[] = {{2048, 1024, 128, 1, 16, 8, true, true},   {8192, 2048, 128, 1, 16, 8, true, false},
                        {1024, 4096, -1, 3, 8, 0, false, true},    {4096, 2048, 128, 8, 32, 64, true, true},
                        {512, 1032, -1, 32, 64, 16, true, true}};
  const std::pair<int, int> plans[] = {{0, 0}, {1, 1}, {4, 2}, {-1, 1}};
  int sms = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint32_t seed = 900;
  for (const Case& c : cases) {
    w4test::UploadedW4 m0(cuda::w4_prepare(w4test::random_quantized(c.n, c.k, 4, c.group, seed++)));
    w4test::UploadedW4 m1(cuda::w4_prepare(w4test::random_quantized(c.n, c.k, 4, c.group, seed++)));
    const uint32_t s0 = seed++, s1 = seed++;
    w4test::DevEc e0(c.k, c.n, c.rank, c.gate, s0), e1(c.k, c.n, c.rank, c.gate, s1);
    const Compensator hc[2] = {w4test::random_compensator(c.k, c.n, c.rank, c.gate, s0),
                               w4test::random_compensator(c.k, c.n, c.rank, c.gate, s1)};
    const std::vector<uint16_t> hx = w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f);
    w4test::W4DevBuf<uint16_t> x(hx), p0(size_t(c.m) * c.n), p1(size_t(c.m) * c.n), q0(size_t(c.m) * c.n),
        q1(size_t(c.m) * c.n);
    w4test::W4DevBuf<float> gz0(size_t(c.m) * c.rank), gz1(size_t(c.m) * c.rank);
    const cuda::W4Device w[2] = {m0.dev, m1.dev};
    const cuda::W4EcDevice* ecs[2] = {c.ec0 ? &e0.dev : nullptr, c.ec1 ? &e1.dev : nullptr};
    float* gz[2] = {gz0.get(), gz1.get()};
    const bool has[2] = {c.ec0, c.ec1};
    for (auto plan : plans) {
      w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true});
      const std::string what = "n " + std::to_string(c.n) + " k " + std::to_string(c.k) + " m " + std::to_string(c.m) +
                               " rank " + std::to_string(c.rank) + " gate " + std::to_string(c.gate) + " plan " +
                               std::to_string(plan.first) + "x" + std::to_string(plan.second);
      __nv_bfloat16* yp[2] = {w4test::bf_mut(p0), w4test::bf_mut(p1)};
      __nv_bfloat16* yq[2] = {w4test::bf_mut(q0), w4test::bf_mut(q1)};
      cuda::w4a16_gemm_grouped(w4test::bf(x), c.m, w, 2, nullptr, yp, nullptr, 0, sms, nullptr);
      std::vector<float> first[2];
      for (int rep = 0; rep < 2; ++rep) {
        ASSERT_TRUE(cuda::w4a16_gemm_ec_project_group(w4test::bf(x), c.m, w, 2, ecs, nullptr, yq, gz, sms, nullptr))
            << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        for (int e = 0; e < 2; ++e) {
          if (!has[e]) continue;
          const std::vector<float> got = (e ? gz1 : gz0).download();
          if (rep == 1) {
            EXPECT_TRUE(got == first[e]) << what << " EC " << e << ": a second launch gave other bits";
            continue;
          }
          first[e] = got;
          double num = 0, den = 0;
          for (int t = 0; t < c.m; ++t) {
            const std::vector<double> ref = gated_z(hc[e], hx, t);
            for (int j = 0; j < c.rank; ++j) {
              const double d = got[size_t(t) * c.rank + j] - ref[size_t(j)];
              num += d * d, den += ref[size_t(j)] * ref[size_t(j)];
            }
          }
          EXPECT_LT(std::sqrt(num / den), 1e-4) << what << " EC " << e << ": g ⊙ z vs double precision";
        }
      }
      EXPECT_TRUE(q0.download() == p0.download()) << what << ": gate output is not the plain grouped GEMM's";
      EXPECT_TRUE(q1.download() == p1.download()) << what << ": up output is not the plain grouped GEMM's";
    }
  }
}

// The SwiGLU launch with EC terms against the host's naive-path roundings (bf16(y + B·gz) for each compensated
// member, then swiglu in fp32 and one rounding), terms on both, on one, ranks 8-64, 1-32 tokens, out aliasing gate.
// At most one bf16 step apart (the fp32 sum order), and the terms must change the result.
TEST(CudaEc, SwigluEcMatchesNaiveRoundings) {
  SPEAR_REQUIRE_GPU();
  struct Case {
    int m, n, rank;
    bool g, u;
  };
  const Case cases[] = {{1, 8192, 16, true, true}, {3, 1000, 8, true, false}, {8, 2048, 64, false, true},
                        {32, 384, 32, true, true}};
  uint32_t seed = 950;
  for (const Case& c : cases) {
    const size_t mn = size_t(c.m) * c.n;
    const std::vector<uint16_t> hg = w4test::random_bf16(mn, seed++, 1.f), hu = w4test::random_bf16(mn, seed++, 1.f);
    const std::vector<uint16_t> hbg = w4test::random_bf16(size_t(c.n) * c.rank, seed++, 0.2f),
                                hbu = w4test::random_bf16(size_t(c.n) * c.rank, seed++, 0.2f);
    std::vector<float> hzg(size_t(c.m) * c.rank), hzu(size_t(c.m) * c.rank);
    {
      const std::vector<float> a = w4test::to_f32(w4test::random_bf16(hzg.size(), seed++, 1.f)),
                               b = w4test::to_f32(w4test::random_bf16(hzu.size(), seed++, 1.f));
      hzg = a, hzu = b;
    }
    w4test::W4DevBuf<uint16_t> g(hg), u(hu), bg(hbg), bu(hbu), out(mn);
    w4test::W4DevBuf<float> zg(hzg), zu(hzu);
    cuda::SwigluEcTerm tg, tu;
    if (c.g) tg = {w4test::bf(bg), zg.get(), c.rank};
    if (c.u) tu = {w4test::bf(bu), zu.get(), c.rank};
    ASSERT_TRUE(cuda::swiglu_ec_takes(c.m, tg, tu));
    const std::string what = "m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " rank " + std::to_string(c.rank);
    for (bool alias : {false, true}) {
      w4test::W4DevBuf<uint16_t> gin(hg);
      __nv_bfloat16* dst = alias ? w4test::bf_mut(gin) : w4test::bf_mut(out);
      cuda::swiglu_ec_bf16(w4test::bf(gin), w4test::bf(u), dst, c.m, c.n, tg, tu, nullptr);
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<uint16_t> got = alias ? gin.download() : out.download();
      int off = 0, moved = 0;
      for (int t = 0; t < c.m; ++t)
        for (int i = 0; i < c.n; ++i) {
          const size_t o = size_t(t) * c.n + i;
          auto with = [&](uint16_t y, const std::vector<uint16_t>& B, const std::vector<float>& z, bool on) {
            if (!on) return bf16_to_f32(y);
            double s = 0;
            for (int j = 0; j < c.rank; ++j) s += double(bf16_to_f32(B[size_t(i) * c.rank + j])) * z[size_t(t) * c.rank + j];
            return bf16_to_f32(f32_to_bf16(float(bf16_to_f32(y) + s)));
          };
          const float a = with(hg[o], hbg, hzg, c.g), b = with(hu[o], hbu, hzu, c.u);
          const float ref = bf16_to_f32(f32_to_bf16(a / (1.f + std::exp(-a)) * b));
          const float plain = bf16_to_f32(f32_to_bf16(bf16_to_f32(hg[o]) / (1.f + std::exp(-bf16_to_f32(hg[o]))) *
                                                      bf16_to_f32(hu[o])));
          const float v = bf16_to_f32(got[o]);
          if (std::fabs(v - ref) > 1.5f * std::ldexp(1.f, std::ilogb(std::max(std::fabs(ref), 1e-3f)) - 7)) ++off;
          if (v != plain) ++moved;
        }
      EXPECT_EQ(off, 0) << what << (alias ? " (out = gate)" : "") << ": elements beyond one bf16 step of the host";
      EXPECT_GT(moved, c.m * c.n / 2) << what << ": the EC terms changed too few elements";
    }
  }
}

}  // namespace spear
