#include "spear/closed_form.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/SVD>

#include "core/error.h"

namespace spear {

namespace {
using MatD = Eigen::MatrixXd;
using MatRD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRD = Eigen::Map<const MatRD>;

void check_shape(const char* what, int rank, int out, int in) {
  if (out <= 0 || in <= 0) fail("{}: bad shape out={} in={}", what, out, in);
  if (rank <= 0) fail("{}: rank must be >= 1, got {}", what, rank);
}

// A square root L of the input second moment, L·Lᵀ = R with R's eigenvalues floored at δ = eps_rel·λ_max(R).
// The weighted truncation only needs some L with L·Lᵀ = R: ‖E·L‖_F² = tr(E R Eᵀ) for every such L, and the
// SVD of ΔW·L differs between choices only by an orthogonal factor on the right. Cholesky is the fast choice
// (0.05 s at in = 1536, where Eigen's SelfAdjointEigenSolver takes seconds):
//   1. λ_min(R) > 2δ (inverse iteration on the factor): no eigenvalue needs the floor, L = chol(R), exact;
//   2. else L = chol(R + δ·I): the floor as a ridge (λ → λ + δ instead of max(λ, δ); they differ only in
//      directions with λ of order δ, which carry a fraction ~eps_rel of the input energy);
//   3. else (R not PSD beyond δ: inconsistent statistics) L = U·max(Λ, δ)^½ from the eigendecomposition.
class InputRoot {
 public:
  InputRoot(const char* what, int in, const double* R, double eps_rel) {
    if (!R) fail("{}: needs the input second moment R", what);
    const MatD r = MapRD(R, in, in);
    if (!r.allFinite()) fail("{}: R [{}x{}] has a non-finite entry", what, in, in);
    const MatD sym = 0.5 * (r + r.transpose());  // accumulated moments are symmetric only up to rounding
    const double lmax = largest_eigenvalue(sym);
    if (!(lmax > 0)) fail("{}: R [{}x{}] has no positive eigenvalue (no input energy)", what, in, in);
    const double delta = std::max(std::max(eps_rel, 0.0) * lmax, std::numeric_limits<double>::min());
    Eigen::LLT<MatD> llt(sym);
    if (llt.info() == Eigen::Success && smallest_eigenvalue(llt) > 2 * delta) {
      L_ = llt.matrixL();
      return;
    }
    llt.compute(sym + delta * MatD::Identity(in, in));
    if (llt.info() == Eigen::Success) {
      L_ = llt.matrixL();
      return;
    }
    Eigen::SelfAdjointEigenSolver<MatD> es(sym);
    if (es.info() != Eigen::Success) fail("{}: eigendecomposition of R [{}x{}] failed", what, in, in);
    eig_ = true;
    U_ = es.eigenvectors();
    s_ = es.eigenvalues().array().max(delta).sqrt();
  }

  MatD times_root(const MatD& M) const {  // M·L
    if (eig_) return (M * U_) * s_.asDiagonal();
    return M * L_.triangularView<Eigen::Lower>();
  }
  MatD times_root_inverse(const MatD& M) const {  // M·L⁻¹
    if (eig_) return (M * s_.cwiseInverse().asDiagonal()) * U_.transpose();
    // X·L = M  ⇔  Lᵀ·Xᵀ = Mᵀ
    return L_.transpose().triangularView<Eigen::Upper>().solve(M.transpose()).transpose();
  }
  MatD times_root_inverse_t(const MatD& M) const {  // M·L⁻ᵀ
    if (eig_) return (M * U_) * s_.cwiseInverse().asDiagonal();
    // X·Lᵀ = M  ⇔  L·Xᵀ = Mᵀ
    return L_.triangularView<Eigen::Lower>().solve(M.transpose()).transpose();
  }

 private:
  // Power iteration: λ_max only sets the regularisation scale, so a few percent accuracy is plenty.
  static double largest_eigenvalue(const MatD& sym) {
    const int n = int(sym.rows());
    Eigen::VectorXd v(n);
    for (int i = 0; i < n; ++i) v(i) = 1.0 + 0.01 * ((i * 7919) % 101);  // not orthogonal to the top vector
    double lambda = 0;
    for (int it = 0; it < 30; ++it) {
      const double nv = v.norm();
      if (!(nv > 0)) return sym.diagonal().maxCoeff();
      v /= nv;
      Eigen::VectorXd w = sym * v;
      lambda = v.dot(w);
      v = w;
    }
    return std::max(lambda, sym.diagonal().maxCoeff());
  }

  // Inverse iteration with the Cholesky factor: an estimate from above of λ_min, good enough to tell whether
  // any eigenvalue is near the floor.
  static double smallest_eigenvalue(const Eigen::LLT<MatD>& llt) {
    const int n = int(llt.matrixLLT().rows());
    Eigen::VectorXd v(n);
    for (int i = 0; i < n; ++i) v(i) = 1.0 + 0.01 * ((i * 104729) % 97);
    double mu = 0;  // ≈ λ_max(R⁻¹)
    for (int it = 0; it < 30; ++it) {
      v /= v.norm();
      Eigen::VectorXd w = llt.solve(v);
      mu = v.dot(w);
      v = w;
      if (!v.allFinite()) return 0;
    }
    return mu > 0 ? 1.0 / mu : 0;
  }

  bool eig_ = false;
  MatD L_;            // [in, in] lower triangular (Cholesky path)
  MatD U_;            // [in, in] eigenvectors (fallback path)
  Eigen::VectorXd s_;  // λ^½, clamped
};

// Truncates M = P Σ Vᵀ [out, in] to rank r and returns B = P_r Σ_r^½ and Σ_r^½ V_rᵀ (before any right
// transform back to the original input basis). Ranks beyond min(out, in) stay zero.
struct Truncated {
  MatD B;   // [out, rank]
  MatD At;  // [rank, in'] in the basis of M's columns
  std::vector<double> sv;
};

Truncated truncate(const MatD& M, int rank) {
  if (!M.allFinite()) fail("closed-form EC init: non-finite entry in the matrix to truncate");
  Eigen::BDCSVD<MatD> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd& sig = svd.singularValues();
  const int k = std::min<int>(rank, int(sig.size()));
  Truncated t;
  t.sv.assign(sig.data(), sig.data() + sig.size());
  const Eigen::VectorXd sq = sig.head(k).cwiseSqrt();
  t.B = MatD::Zero(M.rows(), rank);
  t.At = MatD::Zero(rank, M.cols());
  t.B.leftCols(k) = svd.matrixU().leftCols(k) * sq.asDiagonal();
  t.At.topRows(k) = sq.asDiagonal() * svd.matrixV().leftCols(k).transpose();
  return t;
}

LowRankFactors pack(int rank, const MatD& A, const MatD& B, std::vector<double> sv) {
  LowRankFactors f;
  f.rank = rank;
  f.A.resize(size_t(A.size()));
  f.B.resize(size_t(B.size()));
  Eigen::Map<MatRF>(f.A.data(), A.rows(), A.cols()) = A.cast<float>();
  Eigen::Map<MatRF>(f.B.data(), B.rows(), B.cols()) = B.cast<float>();
  f.singular_values = std::move(sv);
  return f;
}

// QeraExact / Regression share this tail: M·L = P Σ Vᵀ, B = P_r Σ_r^½, A = Σ_r^½ V_rᵀ L⁻¹.
LowRankFactors weighted_truncation(int rank, const MatD& ML, const InputRoot& root) {
  Truncated t = truncate(ML, rank);
  const MatD A = root.times_root_inverse(t.At);
  return pack(rank, A, t.B, std::move(t.sv));
}
}  // namespace

EcInit parse_ec_init(const std::string& s) {
  if (s == "svd") return EcInit::Svd;
  if (s == "lqer") return EcInit::Lqer;
  if (s == "qera") return EcInit::QeraExact;
  if (s == "regression") return EcInit::Regression;
  fail("unknown EC init '{}' (choices: svd, lqer, qera, regression)", s);
}

const char* ec_init_name(EcInit m) {
  switch (m) {
    case EcInit::Svd: return "svd";
    case EcInit::Lqer: return "lqer";
    case EcInit::QeraExact: return "qera";
    case EcInit::Regression: return "regression";
  }
  return "?";
}

LowRankFactors closed_form_init(EcInit method, int rank, int out, int in, const double* dW, const double* R,
                                const double* mean_abs_x, double eps_rel) {
  check_shape("closed-form EC init", rank, out, in);
  if (!dW) fail("closed-form EC init: null weight error");
  const MatD dw = MapRD(dW, out, in);
  switch (method) {
    case EcInit::Svd: {
      Truncated t = truncate(dw, rank);
      return pack(rank, t.At, t.B, std::move(t.sv));
    }
    case EcInit::Lqer: {
      if (!mean_abs_x) fail("closed-form EC init (lqer): needs the mean |x| per input channel");
      Eigen::VectorXd s = Eigen::Map<const Eigen::VectorXd>(mean_abs_x, in).cwiseAbs();
      if (!s.allFinite()) fail("closed-form EC init (lqer): non-finite mean |x|");
      const double smax = s.maxCoeff();
      if (!(smax > 0)) fail("closed-form EC init (lqer): mean |x| is zero on every input channel");
      s = s.cwiseMax(1e-6 * smax);
      Truncated t = truncate(dw * s.asDiagonal(), rank);
      const MatD A = t.At * s.cwiseInverse().asDiagonal();
      return pack(rank, A, t.B, std::move(t.sv));
    }
    case EcInit::QeraExact: {
      const InputRoot root("closed-form EC init (qera)", in, R, eps_rel);
      return weighted_truncation(rank, root.times_root(dw), root);
    }
    case EcInit::Regression:
      fail("closed-form EC init: 'regression' needs the cross moment C; call regression_init");
  }
  fail("closed-form EC init: unknown method {}", int(method));
}

LowRankFactors regression_init(int rank, int out, int in, const double* C, const double* R, double eps_rel) {
  check_shape("regression EC init", rank, out, in);
  if (!C) fail("regression EC init: null cross moment C");
  const InputRoot root("regression EC init", in, R, eps_rel);
  // M·L = C R⁻¹ L = C L⁻ᵀ (with L = U Λ^½ this is C U Λ^-½).
  return weighted_truncation(rank, root.times_root_inverse_t(MapRD(C, out, in)), root);
}

double weighted_error(int out, int in, const double* dW, const float* A, const float* B, int rank, const double* R) {
  if (out <= 0 || in <= 0 || rank < 0) fail("weighted_error: bad shape out={} in={} rank={}", out, in, rank);
  MatD E = MapRD(dW, out, in);
  if (rank > 0) {
    const MatD a = Eigen::Map<const MatRF>(A, rank, in).cast<double>();
    const MatD b = Eigen::Map<const MatRF>(B, out, rank).cast<double>();
    E.noalias() -= b * a;
  }
  const MatD ER = E * MapRD(R, in, in);
  return ER.cwiseProduct(E).sum();
}

}  // namespace spear
