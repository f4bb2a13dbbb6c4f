// The decode-step fusions of the W4 decode kernels (w4a16_gemm_fused) against the kernels they replace, bit for
// bit, under every kind of decode plan (register ring with 1..8 row tiles per CTA and clusters along k, the
// bulk-copy kernel, the planner's): the GEMM, add_bf16, then rms_norm_bf16 (residual and norm tail); the grouped
// gate / up GEMM then swiglu_bf16 (SwiGLU tail, in place and not). Odd n, k not a multiple of 64, per channel and
// groups, 1..8 tokens; the launches must leave their counters at zero. With fused compensators on the matrices, the
// fused launch must equal w4a16_gemm_ec followed by the same ops, under the same plans.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/rms_norm.h"
#include "backend/cuda/w4a16_gemm.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

using w4test::bf_mut;
template <typename T>
using Dev = w4test::W4DevBuf<T>;

struct Case {
  std::vector<int> n;  // the matrices of a grouped launch
  int k, group, m;
};

int sm_count() {
  int sms = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return sms;
}

// (decode_rows, decode_splits) forced for both paths; (0, 0): the planner's, (-1, 1): the bulk-copy kernel.
const std::pair<int, int> kPlans[] = {{0, 0}, {1, 1}, {2, 3}, {4, 1}, {8, 2}, {1, 8}, {-1, 1}};

std::string plan_name(std::pair<int, int> p) { return std::to_string(p.first) + "x" + std::to_string(p.second); }

// A gate / up pair of a case (n[0] rows each) and its input x, from three seeds.
struct GateUp {
  GateUp(const Case& c, uint32_t& seed)
      : g(cuda::w4_prepare(w4test::random_quantized(c.n[0], c.k, 4, c.group, seed++))),
        u(cuda::w4_prepare(w4test::random_quantized(c.n[0], c.k, 4, c.group, seed++))),
        w{g.dev, u.dev},
        x(w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f)) {}
  w4test::UploadedW4 g, u;
  cuda::W4Device w[2];
  Dev<uint16_t> x;
};

void expect_counters_zero(const Dev<unsigned>& c, const std::string& what) {
  size_t nonzero = 0;
  for (unsigned v : c.download()) nonzero += v != 0;
  EXPECT_EQ(nonzero, 0u) << what << ": counters not back at zero";
}

}  // namespace

TEST(CudaW4Fusion, ResidualAndNormTailEqualOpByOp) {
  SKIP_WITHOUT_GPU();
  const Case cases[] = {{{72}, 264, 16, 1},   {{2048}, 2048, 128, 1},  {{2048}, 8192, 128, 8},
                        {{200}, 1032, -1, 3}, {{4096}, 14336, 128, 2}, {{4096}, 4096, -1, 5}};
  uint32_t seed = 1300;
  const int sms = sm_count();
  Dev<unsigned> counters(std::vector<unsigned>(cuda::w4a16_fusion_counter_bytes() / 4, 0u));
  for (const Case& c : cases) {
    const int n = c.n[0];
    w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(n, c.k, 4, c.group, seed++)));
    const size_t ny = size_t(c.m) * n;
    const auto x0 = w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f), r0 = w4test::random_bf16(ny, seed++, 4.f);
    const auto nw = w4test::random_bf16(size_t(n), seed++, 0.5f);
    Dev<uint16_t> x(x0), dnw(nw), tmp(ny);
    for (bool norm : {true, false}) {
      for (auto plan : kPlans) {
        w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true});
        const std::string what = std::string(norm ? "residual + norm" : "residual") + ", n " + std::to_string(n) +
                                 " k " + std::to_string(c.k) + " group " + std::to_string(c.group) + " m " +
                                 std::to_string(c.m) + " plan " + plan_name(plan);
        Dev<uint16_t> res_ref(r0), res_got(r0), h_ref(ny), h_got(std::vector<uint16_t>(ny, 0xffff));
        cuda::w4a16_gemm(bf_mut(x), c.m, mat.dev, nullptr, bf_mut(tmp), nullptr, 0, sms, nullptr);
        cuda::add_bf16(bf_mut(res_ref), bf_mut(tmp), int64_t(ny), nullptr);
        cuda::rms_norm_bf16(bf_mut(res_ref), bf_mut(dnw), bf_mut(h_ref), c.m, n, 1e-5f, nullptr);
        cuda::W4Fusion f;
        f.residual = true;
        if (norm) f.norm_w = bf_mut(dnw), f.eps = 1e-5f, f.norm_out = bf_mut(h_got), f.counters = counters.get();
        __nv_bfloat16* y = bf_mut(res_got);
        ASSERT_TRUE(cuda::w4a16_fusable(c.m, &mat.dev, 1, f, &y)) << what;
        ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(x), c.m, &mat.dev, 1, f, nullptr, &y, sms, nullptr)) << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        EXPECT_TRUE(res_got.download() == res_ref.download()) << what << ": residual stream differs";
        if (norm) {
          EXPECT_TRUE(h_got.download() == h_ref.download()) << what << ": normed output differs";
        }
        expect_counters_zero(counters, what);
      }
    }
  }
}

TEST(CudaW4Fusion, SwigluTailEqualsOpByOp) {
  SKIP_WITHOUT_GPU();
  const Case cases[] = {{{200, 200}, 264, 16, 1},    {{8192, 8192}, 2048, 128, 1}, {{8192, 8192}, 2048, 128, 8},
                        {{1000, 1000}, 4096, -1, 5}, {{96, 96}, 136, 32, 3},       {{14336, 14336}, 4096, 128, 2}};
  uint32_t seed = 1400;
  const int sms = sm_count();
  Dev<unsigned> counters(std::vector<unsigned>(cuda::w4a16_fusion_counter_bytes() / 4, 0u));
  for (const Case& c : cases) {
    const int n = c.n[0];
    GateUp pair(c, seed);
    const cuda::W4Device* w = pair.w;
    const Dev<uint16_t>& x = pair.x;
    const size_t ny = size_t(c.m) * n;
    for (bool in_place : {true, false}) {
      for (auto plan : kPlans) {
        w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true});
        const std::string what = std::string(in_place ? "SwiGLU in place" : "SwiGLU") + ", n " + std::to_string(n) +
                                 " k " + std::to_string(c.k) + " group " + std::to_string(c.group) + " m " +
                                 std::to_string(c.m) + " plan " + plan_name(plan);
        Dev<uint16_t> gr(ny), ur(ny), ar(ny), gf(ny), uf(ny), af(std::vector<uint16_t>(ny, 0xffff));
        __nv_bfloat16* yr[2] = {bf_mut(gr), bf_mut(ur)};
        __nv_bfloat16* yf[2] = {bf_mut(gf), bf_mut(uf)};
        cuda::w4a16_gemm_grouped(bf_mut(x), c.m, w, 2, nullptr, yr, nullptr, 0, sms, nullptr);
        cuda::swiglu_bf16(bf_mut(gr), bf_mut(ur), bf_mut(ar), int64_t(ny), nullptr);
        cuda::W4Fusion f;
        f.swiglu_out = in_place ? yf[0] : bf_mut(af);
        f.counters = counters.get();
        ASSERT_TRUE(cuda::w4a16_fusable(c.m, w, 2, f, yf)) << what;
        ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(x), c.m, w, 2, f, nullptr, yf, sms, nullptr)) << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        EXPECT_TRUE((in_place ? gf : af).download() == ar.download()) << what << ": SwiGLU output differs";
        EXPECT_TRUE(uf.download() == ur.download()) << what << ": up projection differs";
        if (!in_place) {
          EXPECT_TRUE(gf.download() == gr.download()) << what << ": gate projection differs";
        }
        expect_counters_zero(counters, what);
      }
    }
  }
}

// Compensated launches keep their fusions: the EC's term goes into the output before the residual add and the tails,
// and the EC CTAs (which leave early) are not counted by the norm tail's last-CTA detection.
TEST(CudaW4Fusion, CompensatedLaunchesKeepTheTails) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 1500;
  const int sms = sm_count();
  Dev<unsigned> counters(std::vector<unsigned>(cuda::w4a16_fusion_counter_bytes() / 4, 0u));
  const Case norm_cases[] = {{{2048}, 2048, 128, 1}, {{200}, 1032, -1, 3}, {{2048}, 8192, 128, 8}};
  for (const Case& c : norm_cases) {
    const int n = c.n[0];
    w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(n, c.k, 4, c.group, seed++)));
    w4test::DevEc ec(c.k, n, 16, 8, seed++);
    const cuda::W4EcDevice* ecs[1] = {&ec.dev};
    const size_t ny = size_t(c.m) * n;
    const auto x0 = w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f), r0 = w4test::random_bf16(ny, seed++, 4.f);
    Dev<uint16_t> x(x0), dnw(w4test::random_bf16(size_t(n), seed++, 0.5f)), tmp(ny);
    for (auto plan : kPlans)
    for (int gate : {1, 2}) {  // the slice sum and the gate in the W4 CTAs, in the last EC CTA
      w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true, gate});
      const std::string what = "EC + residual + norm, n " + std::to_string(n) + " k " + std::to_string(c.k) +
                               " m " + std::to_string(c.m) + " plan " + plan_name(plan) + " gate " +
                               std::to_string(gate);
      Dev<uint16_t> res_ref(r0), res_got(r0), h_ref(ny), h_got(std::vector<uint16_t>(ny, 0xffff));
      __nv_bfloat16* t = bf_mut(tmp);
      ASSERT_TRUE(cuda::w4a16_gemm_ec(bf_mut(x), c.m, &mat.dev, 1, ecs, nullptr, &t, sms, nullptr)) << what;
      cuda::add_bf16(bf_mut(res_ref), bf_mut(tmp), int64_t(ny), nullptr);
      cuda::rms_norm_bf16(bf_mut(res_ref), bf_mut(dnw), bf_mut(h_ref), c.m, n, 1e-5f, nullptr);
      cuda::W4Fusion f;
      f.residual = true;
      f.norm_w = bf_mut(dnw), f.eps = 1e-5f, f.norm_out = bf_mut(h_got), f.counters = counters.get();
      __nv_bfloat16* y = bf_mut(res_got);
      ASSERT_TRUE(cuda::w4a16_fusable(c.m, &mat.dev, 1, f, &y, ecs)) << what;
      ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(x), c.m, &mat.dev, 1, f, nullptr, &y, sms, nullptr, ecs)) << what;
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(res_got.download() == res_ref.download()) << what << ": residual stream differs";
      EXPECT_TRUE(h_got.download() == h_ref.download()) << what << ": normed output differs";
      expect_counters_zero(counters, what);
    }
  }
  const Case pair_cases[] = {{{8192, 8192}, 2048, 128, 1}, {{1000, 1000}, 4096, -1, 5}, {{96, 96}, 136, 32, 3}};
  for (const Case& c : pair_cases) {
    const int n = c.n[0];
    GateUp pair(c, seed);
    const cuda::W4Device* w = pair.w;
    const Dev<uint16_t>& x = pair.x;
    const size_t ny = size_t(c.m) * n;
    w4test::DevEc eg(c.k, n, 8, 4, seed++), eu(c.k, n, 16, 0, seed++);
    // The gate's EC alone, the up projection's alone, both.
    const cuda::W4EcDevice* placements[3][2] = {{&eg.dev, nullptr}, {nullptr, &eu.dev}, {&eg.dev, &eu.dev}};
    for (const auto& ecs : placements)
      for (auto plan : kPlans) {
        const int gate = 1 + int(&ecs - placements + plan.first + 8) % 2;  // both places, spread over the cases
        w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true, gate});
        const std::string what = std::string("EC on ") + (ecs[0] && ecs[1] ? "both" : ecs[0] ? "gate" : "up") +
                                 " + SwiGLU, n " + std::to_string(n) + " k " + std::to_string(c.k) + " m " +
                                 std::to_string(c.m) + " plan " + plan_name(plan) + " gate " + std::to_string(gate);
        Dev<uint16_t> gr(ny), ur(ny), ar(ny), gf(ny), uf(ny), af(std::vector<uint16_t>(ny, 0xffff));
        __nv_bfloat16* yr[2] = {bf_mut(gr), bf_mut(ur)};
        __nv_bfloat16* yf[2] = {bf_mut(gf), bf_mut(uf)};
        ASSERT_TRUE(cuda::w4a16_gemm_ec(bf_mut(x), c.m, w, 2, ecs, nullptr, yr, sms, nullptr)) << what;
        cuda::swiglu_bf16(bf_mut(gr), bf_mut(ur), bf_mut(ar), int64_t(ny), nullptr);
        cuda::W4Fusion f;
        f.swiglu_out = bf_mut(af);
        f.counters = counters.get();
        ASSERT_TRUE(cuda::w4a16_fusable(c.m, w, 2, f, yf, ecs)) << what;
        ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(x), c.m, w, 2, f, nullptr, yf, sms, nullptr, ecs)) << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        EXPECT_TRUE(af.download() == ar.download()) << what << ": SwiGLU output differs";
        EXPECT_TRUE(gf.download() == gr.download()) << what << ": gate projection differs";
        EXPECT_TRUE(uf.download() == ur.download()) << what << ": up projection differs";
        expect_counters_zero(counters, what);
      }
  }
}

TEST(CudaW4Fusion, RefusesWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(64, 256, 4, 64, 7)));
  w4test::UploadedW4 odd(cuda::w4_prepare(w4test::random_quantized(60, 256, 4, -1, 8)));
  w4test::UploadedW4 other(cuda::w4_prepare(w4test::random_quantized(80, 256, 4, 64, 9)));
  Dev<uint16_t> x(w4test::random_bf16(16 * 256, 9)), nw(w4test::random_bf16(256, 10)), h(16 * 256), y0(16 * 256),
      y1(16 * 256);
  Dev<unsigned> counters(std::vector<unsigned>(cuda::w4a16_fusion_counter_bytes() / 4, 0u));
  __nv_bfloat16* y[2] = {bf_mut(y0), bf_mut(y1)};
  cuda::W4Fusion norm;
  norm.residual = true;
  norm.norm_w = bf_mut(nw);
  norm.norm_out = bf_mut(h);
  norm.counters = counters.get();
  EXPECT_TRUE(cuda::w4a16_fusable(8, &mat.dev, 1, norm, y));
  EXPECT_FALSE(cuda::w4a16_fusable(9, &mat.dev, 1, norm, y)) << "more than 8 tokens";
  EXPECT_FALSE(cuda::w4a16_fusable(1, &odd.dev, 1, norm, y)) << "norm over n % 8 != 0";
  cuda::W4Fusion bad = norm;
  bad.norm_out = bf_mut(h) + 1;
  EXPECT_FALSE(cuda::w4a16_fusable(1, &mat.dev, 1, bad, y)) << "norm output not 16-byte aligned";
  bad = norm;
  bad.counters = nullptr;
  EXPECT_FALSE(cuda::w4a16_fusable(1, &mat.dev, 1, bad, y)) << "no counters";
  bad = norm;
  bad.norm_out = y[0];
  EXPECT_FALSE(cuda::w4a16_fusable(1, &mat.dev, 1, bad, y)) << "norm output aliasing y";
  cuda::W4Fusion sw;
  sw.swiglu_out = y[0];
  sw.counters = counters.get();
  const cuda::W4Device pair[2] = {mat.dev, mat.dev}, mismatched[2] = {mat.dev, other.dev};
  EXPECT_TRUE(cuda::w4a16_fusable(4, pair, 2, sw, y));
  EXPECT_FALSE(cuda::w4a16_fusable(4, &mat.dev, 1, sw, y)) << "SwiGLU of one matrix";
  EXPECT_FALSE(cuda::w4a16_fusable(4, mismatched, 2, sw, y)) << "gate and up of different n";
  bad = sw;
  bad.swiglu_out = y[1];
  EXPECT_FALSE(cuda::w4a16_fusable(4, pair, 2, bad, y)) << "SwiGLU output aliasing up";
  EXPECT_FALSE(cuda::w4a16_gemm_fused(bf_mut(x), 9, &mat.dev, 1, norm, nullptr, y, sm_count(), nullptr));
}

}  // namespace spear
