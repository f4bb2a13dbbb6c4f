// Dense fp32 linear layer. The GEMM is Eigen's, compiled for the build machine (-march=native: AVX-512 /
// AVX2 + FMA) and threaded with OpenMP. OpenBLAS picks its kernel from CPUID at load time and on some
// virtual machines falls back to SSE3 ("Prescott"), 4-5x slower (measured 21 vs 100 GFLOP/s on this
// 2-core machine); a compile-time kernel has no such failure mode. bench/bench_cpu compares both.
#include <Eigen/Core>

#include "backend/cpu/cpu_backend.h"

namespace spear {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void cpu_linear_f32(const float* x, int T, int k, const float* w, const float* bias, int n, float* y) {
  Eigen::Map<const RowMajor> X(x, T, k);
  Eigen::Map<const RowMajor> W(w, n, k);
  Eigen::Map<RowMajor> Y(y, T, n);
  if (T == 1) {
    // GEMV: W [n, k] row-major times x; Eigen's row-major GEMV is a dot product per row.
    Eigen::Map<const Eigen::VectorXf> xv(x, k);
    Eigen::Map<Eigen::VectorXf> yv(y, n);
    yv.noalias() = W * xv;
  } else {
    Y.noalias() = X * W.transpose();
  }
  if (bias) {
    Eigen::Map<const Eigen::RowVectorXf> b(bias, n);
    Y.rowwise() += b;
  }
}

}  // namespace spear
