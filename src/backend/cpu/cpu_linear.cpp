// Dense fp32 linear layer through OpenBLAS.
#include <cblas.h>

#include "backend/cpu/cpu_backend.h"

namespace spear {

void cpu_linear_f32(const float* x, int T, int k, const float* w, const float* bias, int n, float* y) {
  if (T == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.f, w, k, x, 1, 0.f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, n, k, 1.f, x, k, w, k, 0.f, y, n);
  }
  if (bias) {
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < n; ++j) y[size_t(t) * n + j] += bias[j];
  }
}

}  // namespace spear
