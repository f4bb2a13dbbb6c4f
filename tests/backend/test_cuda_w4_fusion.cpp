// The decode-step fusions of the W4 decode kernels (w4a16_gemm_fused) against the kernels they replace, bit for
// bit, under every kind of decode plan (register ring with 1..8 row tiles per CTA and clusters along k, the
// bulk-copy kernel, the tuned one): rms_norm_bf16 then the grouped GEMM; swiglu_bf16, the GEMM, then add_bf16;
// the GEMM then add_bf16. Odd n, k not a multiple of 64, per channel and groups, 1..8 tokens.
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

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

}  // namespace

TEST(CudaW4Fusion, NormBeforeGroupedGemmEqualsOpByOp) {
  SKIP_WITHOUT_GPU();
  const Case cases[] = {{{200, 72, 72}, 264, 16, 1},  {{3072, 512, 512}, 2048, 128, 8},
                        {{8192, 8192}, 2048, 128, 1}, {{1000, 24}, 4096, -1, 5},
                        {{96}, 136, 32, 3},           {{4096, 1024, 1024}, 4096, 64, 2}};
  uint32_t seed = 1200;
  const int sms = sm_count();
  for (const Case& c : cases) {
    const int count = int(c.n.size());
    std::vector<std::unique_ptr<w4test::UploadedW4>> mats;
    std::vector<cuda::W4Device> w;
    for (int n : c.n) {
      mats.push_back(std::make_unique<w4test::UploadedW4>(
          cuda::w4_prepare(w4test::random_quantized(n, c.k, 4, c.group, seed++))));
      w.push_back(mats.back()->dev);
    }
    const auto x0 = w4test::random_bf16(size_t(c.m) * c.k, seed++, 2.f);
    const auto nw = w4test::random_bf16(size_t(c.k), seed++, 0.5f);
    Dev<uint16_t> x(x0), dnw(nw), h(size_t(c.m) * c.k);
    cuda::rms_norm_bf16(bf_mut(x), bf_mut(dnw), bf_mut(h), c.m, c.k, 1e-5f, nullptr);
    cuda::W4Fusion f;
    f.norm_w = bf_mut(dnw);
    f.eps = 1e-5f;
    ASSERT_TRUE(cuda::w4a16_fusable(c.m, w.data(), count, f, bf_mut(x)));
    for (auto [rows, splits] : kPlans) {
      w4test::ScopedW4Options scoped({true, 0, rows, splits, true});
      std::vector<std::unique_ptr<Dev<uint16_t>>> yr, yf;
      std::vector<__nv_bfloat16*> pr, pf;
      for (int n : c.n) {
        yr.push_back(w4test::poisoned_y(size_t(c.m) * n));
        yf.push_back(w4test::poisoned_y(size_t(c.m) * n));
        pr.push_back(bf_mut(*yr.back()));
        pf.push_back(bf_mut(*yf.back()));
      }
      cuda::w4a16_gemm_grouped(bf_mut(h), c.m, w.data(), count, nullptr, pr.data(), nullptr, 0, sms, nullptr);
      ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(x), c.m, w.data(), count, f, nullptr, pf.data(), sms, nullptr));
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      const std::string what = "n0 " + std::to_string(c.n[0]) + " k " + std::to_string(c.k) + " group " +
                               std::to_string(c.group) + " m " + std::to_string(c.m) + " plan " +
                               std::to_string(rows) + "x" + std::to_string(splits);
      for (int i = 0; i < count; ++i) {
        std::vector<uint16_t> ref, got;
        w4test::check_poisoned(*yr[size_t(i)], size_t(c.m) * c.n[size_t(i)], what, &ref);
        w4test::check_poisoned(*yf[size_t(i)], size_t(c.m) * c.n[size_t(i)], what, &got);
        EXPECT_TRUE(got == ref) << what << ", matrix " << i << ": fused norm differs from rms_norm + GEMM";
      }
      EXPECT_TRUE(x.download() == x0) << what << ": the residual stream changed";
    }
  }
}

TEST(CudaW4Fusion, SwigluAndResidualEqualOpByOp) {
  SKIP_WITHOUT_GPU();
  const Case cases[] = {{{72}, 264, 16, 1},     {{2048}, 8192, 128, 1}, {{2048}, 8192, 128, 8},
                        {{200}, 1032, -1, 3},   {{4096}, 14336, 128, 2}};
  uint32_t seed = 1300;
  const int sms = sm_count();
  for (const Case& c : cases) {
    const int n = c.n[0];
    w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(n, c.k, 4, c.group, seed++)));
    const size_t na = size_t(c.m) * c.k, ny = size_t(c.m) * n;
    const auto g0 = w4test::random_bf16(na, seed++, 2.f), u0 = w4test::random_bf16(na, seed++, 1.f);
    const auto r0 = w4test::random_bf16(ny, seed++, 4.f);
    Dev<uint16_t> gate(g0), up(u0), act(na), tmp(ny);
    cuda::swiglu_bf16(bf_mut(gate), bf_mut(up), bf_mut(act), int64_t(na), nullptr);
    for (bool swiglu : {true, false}) {
      cuda::W4Fusion f;
      f.up = swiglu ? bf_mut(up) : nullptr;
      f.residual = true;
      const auto& in = swiglu ? gate : act;
      ASSERT_TRUE(cuda::w4a16_fusable(c.m, &mat.dev, 1, f, bf_mut(in)));
      for (auto [rows, splits] : kPlans) {
        w4test::ScopedW4Options scoped({true, 0, rows, splits, true});
        Dev<uint16_t> res_ref(r0), res_got(r0);
        __nv_bfloat16* y = bf_mut(res_got);
        cuda::w4a16_gemm(bf_mut(act), c.m, mat.dev, nullptr, bf_mut(tmp), nullptr, 0, sms, nullptr);
        cuda::add_bf16(bf_mut(res_ref), bf_mut(tmp), int64_t(ny), nullptr);
        ASSERT_TRUE(cuda::w4a16_gemm_fused(bf_mut(in), c.m, &mat.dev, 1, f, nullptr, &y, sms, nullptr));
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        const std::string what = std::string(swiglu ? "swiglu + residual" : "residual") + ", n " +
                                 std::to_string(n) + " k " + std::to_string(c.k) + " group " +
                                 std::to_string(c.group) + " m " + std::to_string(c.m) + " plan " +
                                 std::to_string(rows) + "x" + std::to_string(splits);
        const std::vector<uint16_t> ref = res_ref.download(), got = res_got.download();
        size_t same = 0;
        for (size_t i = 0; i < ny; ++i) same += ref[i] == got[i];
        EXPECT_EQ(same, ny) << what << ": outputs differ from the op-by-op path";
      }
    }
  }
}

TEST(CudaW4Fusion, RefusesWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(64, 256, 4, 64, 7)));
  w4test::UploadedW4 odd(cuda::w4_prepare(w4test::random_quantized(64, 100, 4, -1, 8)));
  Dev<uint16_t> x(w4test::random_bf16(16 * 256, 9)), nw(w4test::random_bf16(256, 10));
  cuda::W4Fusion norm;
  norm.norm_w = bf_mut(nw);
  EXPECT_TRUE(cuda::w4a16_fusable(8, &mat.dev, 1, norm, bf_mut(x)));
  EXPECT_FALSE(cuda::w4a16_fusable(9, &mat.dev, 1, norm, bf_mut(x))) << "more than 8 tokens";
  EXPECT_FALSE(cuda::w4a16_fusable(1, &mat.dev, 1, norm, bf_mut(x) + 1)) << "x not 16-byte aligned";
  EXPECT_FALSE(cuda::w4a16_fusable(1, &odd.dev, 1, norm, bf_mut(x))) << "k % 8 != 0";
  cuda::W4Fusion both = norm;
  both.up = bf_mut(x);
  EXPECT_FALSE(cuda::w4a16_fusable(1, &mat.dev, 1, both, bf_mut(x))) << "norm and SwiGLU at once";
  __nv_bfloat16* y = bf_mut(x);
  EXPECT_FALSE(cuda::w4a16_gemm_fused(bf_mut(x), 9, &mat.dev, 1, norm, nullptr, &y, sm_count(), nullptr));
}

}  // namespace spear
