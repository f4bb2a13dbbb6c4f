// The small-M dense GEMV (lm_head of decode steps) against a plain CPU loop on bf16-rounded inputs.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dense_gemv.h"
#include "core/dtype.h"

namespace spear {

TEST(CudaDenseGemv, MatchesCpuLoop) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto [m, n, k] : {std::tuple{1, 1000, 2048}, {2, 70001, 64}, {3, 513, 4096}, {5, 128256, 2048}, {8, 96, 8}}) {
    for (bool f32 : {true, false}) {
      std::vector<uint16_t> xb(static_cast<size_t>(m) * k), wb(static_cast<size_t>(n) * k), bb(static_cast<size_t>(n));
      for (auto& v : xb) v = f32_to_bf16(nd(rng));
      for (auto& v : wb) v = f32_to_bf16(0.05f * nd(rng));
      for (auto& v : bb) v = f32_to_bf16(nd(rng));
      std::vector<double> ref(size_t(m) * n);
      for (int t = 0; t < m; ++t)
        for (int r = 0; r < n; ++r) {
          double a = bf16_to_f32(bb[size_t(r)]);
          for (int c = 0; c < k; ++c) a += double(bf16_to_f32(xb[size_t(t) * k + c])) * bf16_to_f32(wb[size_t(r) * k + c]);
          ref[size_t(t) * n + r] = a;
        }
      void *dx, *dw, *db, *dy;
      const size_t ybytes = ref.size() * (f32 ? 4 : 2);
      SPEAR_CUDA_CHECK(cudaMalloc(&dx, xb.size() * 2));
      SPEAR_CUDA_CHECK(cudaMalloc(&dw, wb.size() * 2));
      SPEAR_CUDA_CHECK(cudaMalloc(&db, bb.size() * 2));
      SPEAR_CUDA_CHECK(cudaMalloc(&dy, ybytes + 64));
      SPEAR_CUDA_CHECK(cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemcpy(dw, wb.data(), wb.size() * 2, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemcpy(db, bb.data(), bb.size() * 2, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemset(dy, 0xff, ybytes + 64));  // NaN poison, and a canary after the output
      ASSERT_TRUE(cuda::dense_gemv_bf16(static_cast<__nv_bfloat16*>(dx), m, static_cast<__nv_bfloat16*>(dw), n, k,
                                        static_cast<__nv_bfloat16*>(db), dy, f32, nullptr));
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<uint8_t> got(ybytes + 64);
      SPEAR_CUDA_CHECK(cudaMemcpy(got.data(), dy, got.size(), cudaMemcpyDeviceToHost));
      double num = 0, den = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        float v;
        if (f32) {
          std::memcpy(&v, got.data() + 4 * i, 4);
        } else {
          uint16_t h;
          std::memcpy(&h, got.data() + 2 * i, 2);
          v = bf16_to_f32(h);
        }
        ASSERT_TRUE(std::isfinite(v)) << "element " << i << " not written";
        num += (v - ref[i]) * (v - ref[i]);
        den += ref[i] * ref[i];
      }
      for (size_t i = ybytes; i < got.size(); ++i) ASSERT_EQ(got[i], 0xff) << "write past the output";
      const double rel = std::sqrt(num / den);
      std::printf("dense gemv m %d n %d k %d %s: rel err %.2e\n", m, n, k, f32 ? "f32" : "bf16", rel);
      EXPECT_LT(rel, f32 ? 1e-5 : 5e-3);
      cudaFree(dx), cudaFree(dw), cudaFree(db), cudaFree(dy);
    }
  }
}

}  // namespace spear
