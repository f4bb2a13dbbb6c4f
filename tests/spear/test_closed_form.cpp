#include <chrono>
#include <cmath>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/SVD>
#include <gtest/gtest.h>

#include "spear/closed_form.h"
#include "test_util.h"

namespace spear {
namespace {

using MatD = Eigen::MatrixXd;
using MatRD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One layer's statistics: dW [out, in] and R = E[x xᵀ], E|x| from n correlated samples whose input channels
// span four decades of scale (like LLM activations with outlier channels).
struct Problem {
  int out, in;
  MatRD dW, R;
  std::vector<double> mean_abs;
};

Problem make_problem(int out, int in, uint64_t seed, int n = 4000) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  Problem p{out, in, MatRD(out, in), MatRD::Zero(in, in), std::vector<double>(size_t(in), 0.0)};
  for (int i = 0; i < p.dW.size(); ++i) p.dW.data()[i] = nd(rng);
  MatD mix(in, in);
  for (int i = 0; i < mix.size(); ++i) mix.data()[i] = nd(rng);
  Eigen::VectorXd scale(in);
  for (int j = 0; j < in; ++j) scale(j) = std::pow(10.0, 2.0 * j / std::max(1, in - 1) - 1.0);
  MatD X(n, in);
  for (int i = 0; i < X.size(); ++i) X.data()[i] = nd(rng);
  X = (X * mix) * scale.asDiagonal();
  p.R = X.transpose() * X / n;
  for (int j = 0; j < in; ++j) p.mean_abs[size_t(j)] = X.col(j).cwiseAbs().mean();
  return p;
}

MatD product(const LowRankFactors& f, int out, int in) {
  const MatD B = Eigen::Map<const MatRF>(f.B.data(), out, f.rank).cast<double>();
  const MatD A = Eigen::Map<const MatRF>(f.A.data(), f.rank, in).cast<double>();
  return B * A;
}

LowRankFactors init(EcInit m, int rank, const Problem& p) {
  return closed_form_init(m, rank, p.out, p.in, p.dW.data(), p.R.data(), p.mean_abs.data());
}

double werr(const Problem& p, const LowRankFactors& f) {
  return weighted_error(p.out, p.in, p.dW.data(), f.A.data(), f.B.data(), f.rank, p.R.data());
}

double tail_sq(const std::vector<double>& s, int r) {
  double t = 0;
  for (size_t i = size_t(r); i < s.size(); ++i) t += s[i] * s[i];
  return t;
}

// The factors are fp32 (the EC's format): products agree with an fp64 reference to ~1e-7 relative.
constexpr double kFp32Rel = 2e-6;

TEST(ClosedForm, ParseAndName) {
  for (EcInit m : {EcInit::Svd, EcInit::Lqer, EcInit::QeraExact, EcInit::Regression})
    EXPECT_EQ(parse_ec_init(ec_init_name(m)), m);
  EXPECT_SPEAR_ERROR(parse_ec_init("eora"), "svd, lqer, qera, regression");
}

TEST(ClosedForm, QeraExactEqualsDirectComputation) {
  const int out = 20, in = 16, r = 3;
  const Problem p = make_problem(out, in, 1);
  // Direct: L = U Λ^½ explicitly, full SVD of dW·L, BA = (P_r Σ_r Q_rᵀ) L⁻¹.
  Eigen::SelfAdjointEigenSolver<MatD> es(MatD(p.R));
  ASSERT_GT(es.eigenvalues().minCoeff(), 1e-8 * es.eigenvalues().maxCoeff());  // no clamping in this problem
  const MatD L = es.eigenvectors() * es.eigenvalues().cwiseSqrt().asDiagonal();
  const MatD W = MatD(p.dW) * L;
  Eigen::JacobiSVD<MatD> svd(W, Eigen::ComputeFullU | Eigen::ComputeFullV);
  const MatD Wr = svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() *
                  svd.matrixV().leftCols(r).transpose();
  const MatD want = Wr * L.inverse();

  const LowRankFactors f = init(EcInit::QeraExact, r, p);
  ASSERT_EQ(f.rank, r);
  ASSERT_EQ(f.A.size(), size_t(r * in));
  ASSERT_EQ(f.B.size(), size_t(out * r));
  ASSERT_EQ(f.singular_values.size(), size_t(in));
  for (int i = 0; i < in; ++i)
    EXPECT_NEAR(f.singular_values[size_t(i)], svd.singularValues()(i), 1e-9 * svd.singularValues()(0));
  EXPECT_LT((product(f, out, in) - want).norm(), kFp32Rel * want.norm());

  // Optimal in the weighted norm: the error left is exactly the discarded spectrum of dW·L.
  const double opt = tail_sq(f.singular_values, r);
  EXPECT_NEAR(werr(p, f), opt, 1e-5 * opt);
  const double e_svd = werr(p, init(EcInit::Svd, r, p)), e_lqer = werr(p, init(EcInit::Lqer, r, p));
  EXPECT_LE(werr(p, f), e_svd);
  EXPECT_LE(werr(p, f), e_lqer);
  EXPECT_LT(werr(p, f), 0.9 * e_svd);  // the wide input spectrum makes the plain SVD clearly worse
}

TEST(ClosedForm, SvdIsFrobeniusOptimal) {
  const int out = 20, in = 16;
  const Problem p = make_problem(out, in, 2);
  for (int r : {1, 3, 7}) {
    const LowRankFactors f = init(EcInit::Svd, r, p);
    const double err = (MatD(p.dW) - product(f, out, in)).squaredNorm();
    const double opt = tail_sq(f.singular_values, r);
    EXPECT_NEAR(err, opt, 1e-5 * opt) << "rank " << r;
    Eigen::JacobiSVD<MatD> svd(MatD(p.dW));
    EXPECT_NEAR(f.singular_values[0], svd.singularValues()(0), 1e-10 * svd.singularValues()(0));
  }
}

TEST(ClosedForm, LqerScalesByMeanAbsInput) {
  const int out = 12, in = 10, r = 2;
  const Problem p = make_problem(out, in, 3);
  const LowRankFactors f = init(EcInit::Lqer, r, p);
  const Eigen::VectorXd s = Eigen::Map<const Eigen::VectorXd>(p.mean_abs.data(), in);
  const MatD M = MatD(p.dW) * s.asDiagonal();
  Eigen::JacobiSVD<MatD> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const MatD want = svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() *
                    svd.matrixV().leftCols(r).transpose() * s.cwiseInverse().asDiagonal();
  EXPECT_LT((product(f, out, in) - want).norm(), kFp32Rel * want.norm());
}

TEST(ClosedForm, RegressionWithoutPropagatedErrorIsQeraExact) {
  for (auto [out, in] : {std::pair{20, 16}, std::pair{9, 14}}) {
    const Problem p = make_problem(out, in, 4 + out);
    const MatRD C = p.dW * p.R;  // y_fp − Q·x = dW·x exactly
    for (int r : {1, 4}) {
      const LowRankFactors q = init(EcInit::QeraExact, r, p);
      const LowRankFactors g = regression_init(r, out, in, C.data(), p.R.data());
      const MatD bq = product(q, out, in), bg = product(g, out, in);
      EXPECT_LT((bq - bg).norm(), 1e-5 * bq.norm()) << out << "x" << in << " rank " << r;
      for (size_t i = 0; i < q.singular_values.size(); ++i)
        EXPECT_NEAR(q.singular_values[i], g.singular_values[i], 1e-7 * q.singular_values[0]);
    }
  }
}

TEST(ClosedForm, RegressionFitsALowRankTarget) {
  // The target map is exactly rank 2 and not ΔW: regression must recover it, with zero residual left.
  const int out = 15, in = 11, r = 2;
  const Problem p = make_problem(out, in, 5);
  std::mt19937_64 rng(6);
  std::normal_distribution<double> nd;
  MatD u(out, r), v(r, in);
  for (int i = 0; i < u.size(); ++i) u.data()[i] = nd(rng);
  for (int i = 0; i < v.size(); ++i) v.data()[i] = nd(rng);
  const MatD M = u * v;
  const MatRD C = M * MatD(p.R);
  const LowRankFactors g = regression_init(r, out, in, C.data(), p.R.data());
  EXPECT_LT((product(g, out, in) - M).norm(), kFp32Rel * 10 * M.norm());
  EXPECT_LT(g.singular_values[size_t(r)], 1e-9 * g.singular_values[0]);
}

TEST(ClosedForm, FullRankIsExact) {
  for (auto [out, in] : {std::pair{20, 16}, std::pair{8, 13}}) {
    const Problem p = make_problem(out, in, 7);
    const double base = weighted_error(out, in, p.dW.data(), nullptr, nullptr, 0, p.R.data());
    for (EcInit m : {EcInit::Svd, EcInit::Lqer, EcInit::QeraExact})
      for (int r : {std::min(out, in), std::min(out, in) + 3}) {
        const LowRankFactors f = init(m, r, p);
        EXPECT_EQ(f.rank, r);
        EXPECT_EQ(f.A.size(), size_t(r) * in);
        EXPECT_EQ(f.B.size(), size_t(out) * r);
        EXPECT_LT(werr(p, f), 1e-10 * base) << ec_init_name(m) << " rank " << r;
      }
  }
}

TEST(ClosedForm, ClampsASingularR) {
  // R of rank 3 (inputs live in a 3-dim subspace): the clamp keeps A finite; the weighted error is still
  // the discarded spectrum.
  const int out = 10, in = 8, r = 2;
  Problem p = make_problem(out, in, 8);
  std::mt19937_64 rng(9);
  std::normal_distribution<double> nd;
  MatD basis(in, 3);
  for (int i = 0; i < basis.size(); ++i) basis.data()[i] = nd(rng);
  p.R = basis * basis.transpose();
  const LowRankFactors f = init(EcInit::QeraExact, r, p);
  for (float a : f.A) ASSERT_TRUE(std::isfinite(a));
  const double opt = tail_sq(f.singular_values, r);
  EXPECT_NEAR(werr(p, f), opt, 1e-4 * f.singular_values[0] * f.singular_values[0]);
  EXPECT_LT(f.singular_values[3], 1e-3 * f.singular_values[0]);
}

TEST(ClosedForm, NonPsdRFallsBackToClampedEigendecomposition) {
  // R with a negative eigenvalue (inconsistent statistics): Cholesky fails even with the ridge; the fallback
  // clamps λ to eps_rel·λ_max, which must equal running on the explicitly clamped R.
  const int out = 9, in = 7, r = 3;
  Problem p = make_problem(out, in, 12);
  Eigen::SelfAdjointEigenSolver<MatD> es(MatD(p.R));
  Eigen::VectorXd lam = es.eigenvalues();
  const double eps = 1e-2, floor = eps * lam.maxCoeff();
  lam(0) = -3 * floor;  // beyond what the ridge δ·I repairs
  lam(1) = 0.1 * floor;
  const MatRD bad = es.eigenvectors() * lam.asDiagonal() * es.eigenvectors().transpose();
  const MatRD clamped = es.eigenvectors() * lam.cwiseMax(floor).asDiagonal() * es.eigenvectors().transpose();
  const LowRankFactors f = closed_form_init(EcInit::QeraExact, r, out, in, p.dW.data(), bad.data(), nullptr, eps);
  const LowRankFactors g = closed_form_init(EcInit::QeraExact, r, out, in, p.dW.data(), clamped.data(), nullptr, 0.0);
  const MatD bf = product(f, out, in), bg = product(g, out, in);
  EXPECT_LT((bf - bg).norm(), 1e-5 * bg.norm());
}

TEST(ClosedForm, Errors) {
  const Problem p = make_problem(6, 5, 10, 100);
  EXPECT_SPEAR_ERROR(init(EcInit::QeraExact, 0, p), "rank must be >= 1");
  EXPECT_SPEAR_ERROR(init(EcInit::Svd, -2, p), "rank must be >= 1");
  EXPECT_SPEAR_ERROR(regression_init(0, 6, 5, p.dW.data(), p.R.data()), "rank must be >= 1");
  EXPECT_SPEAR_ERROR(closed_form_init(EcInit::QeraExact, 2, 6, 5, p.dW.data(), nullptr, nullptr),
                     "needs the input second moment");
  EXPECT_SPEAR_ERROR(closed_form_init(EcInit::Lqer, 2, 6, 5, p.dW.data(), nullptr, nullptr), "mean |x|");
  EXPECT_SPEAR_ERROR(init(EcInit::Regression, 2, p), "regression_init");
  EXPECT_SPEAR_ERROR(closed_form_init(EcInit::Svd, 2, 0, 5, p.dW.data(), nullptr, nullptr), "bad shape");
  const std::vector<double> zero(25, 0.0);
  EXPECT_SPEAR_ERROR(closed_form_init(EcInit::QeraExact, 2, 6, 5, p.dW.data(), zero.data(), nullptr),
                     "no positive eigenvalue");
}

TEST(ClosedForm, FastEnoughForModelShapes) {
  for (auto [out, in] : {std::pair{1536, 512}, std::pair{512, 1536}}) {
    std::mt19937_64 rng(11);
    std::normal_distribution<double> nd;
    MatRD dW(out, in);
    for (int i = 0; i < dW.size(); ++i) dW.data()[i] = nd(rng);
    MatD X(2 * in, in);
    for (int i = 0; i < X.size(); ++i) X.data()[i] = nd(rng);
    const MatRD R = X.transpose() * X / double(X.rows());
    const auto t0 = std::chrono::steady_clock::now();
    const LowRankFactors f = closed_form_init(EcInit::QeraExact, 32, out, in, dW.data(), R.data(), nullptr);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("qera %dx%d rank 32: %.3f s\n", out, in, s);
    EXPECT_EQ(f.A.size(), size_t(32) * in);
    EXPECT_LT(s, 5.0);  // generous: shared CI machines; typically well under a second
  }
}

}  // namespace
}  // namespace spear
