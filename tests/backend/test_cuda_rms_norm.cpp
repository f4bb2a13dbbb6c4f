// CUDA RMSNorm against the CPU reference kernel on random shapes (odd sizes included).
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rms_norm.h"
#include "core/dtype.h"

namespace spear {

TEST(CudaRmsNorm, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 2.f);
  for (auto [rows, d] : {std::pair{1, 64}, {7, 513}, {33, 4096}, {128, 2048}}) {
    std::vector<uint16_t> xb(static_cast<size_t>(rows) * d), wb(static_cast<size_t>(d));
    std::vector<float> x(xb.size()), w(wb.size()), ref(xb.size());
    for (size_t i = 0; i < xb.size(); ++i) x[i] = bf16_to_f32(xb[i] = f32_to_bf16(nd(rng)));
    for (size_t i = 0; i < wb.size(); ++i) w[i] = bf16_to_f32(wb[i] = f32_to_bf16(1.f + 0.1f * nd(rng)));
    cpu_rms_norm_f32(x.data(), w.data(), rows, d, 1e-5f, ref.data());
    __nv_bfloat16 *dx, *dw, *dout;
    SPEAR_CUDA_CHECK(cudaMalloc(&dx, xb.size() * 2));
    SPEAR_CUDA_CHECK(cudaMalloc(&dw, wb.size() * 2));
    SPEAR_CUDA_CHECK(cudaMalloc(&dout, xb.size() * 2));
    SPEAR_CUDA_CHECK(cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice));
    SPEAR_CUDA_CHECK(cudaMemcpy(dw, wb.data(), wb.size() * 2, cudaMemcpyHostToDevice));
    SPEAR_CUDA_CHECK(cudaMemset(dout, 0xff, xb.size() * 2));  // poison: every element must be written
    cuda::rms_norm_bf16(dx, dw, dout, rows, d, 1e-5f, nullptr);
    std::vector<uint16_t> got(xb.size());
    SPEAR_CUDA_CHECK(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dout);
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      float g = bf16_to_f32(got[i]);
      ASSERT_TRUE(std::isfinite(g)) << "element " << i << " not written";
      num += (g - ref[i]) * (g - ref[i]);
      den += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(num / den), 5e-3) << rows << "x" << d;  // bf16 output rounding
  }
}

}  // namespace spear
