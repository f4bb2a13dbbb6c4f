#include <cmath>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>
#include <gtest/gtest.h>

#include "spear/cka.h"
#include "test_util.h"

namespace spear {
namespace {

using MatRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Random [n, d] with correlated columns and a non-zero mean, so centring and the Gram terms both matter.
MatRF random_features(int n, int d, uint64_t seed, float mean = 0.5f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  MatRF z(n, d), mix(d, d);
  for (int i = 0; i < z.size(); ++i) z.data()[i] = nd(rng);
  for (int i = 0; i < mix.size(); ++i) mix.data()[i] = nd(rng) / std::sqrt(float(d));
  MatRF x = z * mix;
  for (int j = 0; j < d; ++j) x.col(j).array() += mean * float(j % 5);
  return x;
}

// The definition written out: explicit centring, double loops.
double naive_cka(const MatRF& X, const MatRF& Y) {
  const int n = int(X.rows()), dx = int(X.cols()), dy = int(Y.cols());
  std::vector<double> xc(size_t(n) * dx), yc(size_t(n) * dy);
  for (int j = 0; j < dx; ++j) {
    double m = 0;
    for (int i = 0; i < n; ++i) m += X(i, j);
    m /= n;
    for (int i = 0; i < n; ++i) xc[size_t(i) * dx + j] = X(i, j) - m;
  }
  for (int j = 0; j < dy; ++j) {
    double m = 0;
    for (int i = 0; i < n; ++i) m += Y(i, j);
    m /= n;
    for (int i = 0; i < n; ++i) yc[size_t(i) * dy + j] = Y(i, j) - m;
  }
  auto gram_sq = [n](const std::vector<double>& a, int da, const std::vector<double>& b, int db) {
    double s = 0;
    for (int p = 0; p < da; ++p)
      for (int q = 0; q < db; ++q) {
        double g = 0;
        for (int i = 0; i < n; ++i) g += a[size_t(i) * da + p] * b[size_t(i) * db + q];
        s += g * g;
      }
    return s;
  };
  return gram_sq(yc, dy, xc, dx) / (std::sqrt(gram_sq(xc, dx, xc, dx)) * std::sqrt(gram_sq(yc, dy, yc, dy)));
}

TEST(Cka, SelfSimilarityIsOne) {
  const MatRF X = random_features(300, 24, 1);
  EXPECT_NEAR(linear_cka(X.data(), X.data(), 300, 24, 24), 1.0, 1e-12);
}

TEST(Cka, InvariantToOrthogonalTransformAndScaling) {
  const int n = 400, d = 16;
  const MatRF X = random_features(n, d, 2);
  MatRF noise = random_features(n, d, 3, 0.f);
  const MatRF Y = X + 0.7f * noise;
  std::mt19937_64 rng(4);
  std::normal_distribution<double> nd;
  Eigen::MatrixXd G(d, d);
  for (int i = 0; i < G.size(); ++i) G.data()[i] = nd(rng);
  const Eigen::MatrixXd Q = Eigen::HouseholderQR<Eigen::MatrixXd>(G).householderQ();
  ASSERT_LT((Q.transpose() * Q - Eigen::MatrixXd::Identity(d, d)).norm(), 1e-12);
  const MatRF YQ = (Y.cast<double>() * Q).cast<float>();
  const MatRF Ys = 37.5f * Y;
  const double base = linear_cka(X.data(), Y.data(), n, d, d);
  EXPECT_GT(base, 0.2);
  EXPECT_LT(base, 0.95);
  EXPECT_NEAR(linear_cka(X.data(), YQ.data(), n, d, d), base, 1e-6);  // Y·Q rounded to fp32
  EXPECT_NEAR(linear_cka(X.data(), Ys.data(), n, d, d), base, 1e-6);
  EXPECT_NEAR(linear_cka(Y.data(), X.data(), n, d, d), base, 1e-12);  // symmetric
}

TEST(Cka, MatchesNaiveDefinition) {
  const int n = 57, dx = 9, dy = 6;
  const MatRF X = random_features(n, dx, 5);
  MatRF Y = random_features(n, dy, 6);
  Y.leftCols(3) += X.leftCols(3);
  const double got = linear_cka(X.data(), Y.data(), n, dx, dy);
  const double want = naive_cka(X, Y);
  EXPECT_NEAR(got, want, 1e-12 * std::max(1.0, want));
  EXPECT_GT(want, 0.05);
}

TEST(Cka, ChunkedEqualsOneShot) {
  const int n = 1000, dx = 32, dy = 20;
  const MatRF X = random_features(n, dx, 7);
  MatRF Y = random_features(n, dy, 8, 3.f);
  Y += X.leftCols(dy);
  CkaAccumulator acc(dx, dy);
  int done = 0;
  for (int chunk : {1, 13, 250, 0, 400, 336}) {
    acc.add(X.data() + size_t(done) * dx, Y.data() + size_t(done) * dy, chunk);
    done += chunk;
  }
  ASSERT_EQ(done, n);
  EXPECT_EQ(acc.rows(), n);
  EXPECT_NEAR(acc.value(), linear_cka(X.data(), Y.data(), n, dx, dy), 1e-12);
  EXPECT_NEAR(acc.value(), naive_cka(X, Y), 1e-10);
}

TEST(Cka, BoundedAndSmallForIndependentData) {
  const int n = 20000, d = 8;
  for (uint64_t s = 0; s < 5; ++s) {
    const MatRF X = random_features(n, d, 100 + s), Y = random_features(n, d, 200 + s);
    const double v = linear_cka(X.data(), Y.data(), n, d, d);
    EXPECT_GE(v, 0.0);
    EXPECT_LE(v, 1.0);
    EXPECT_LT(v, 0.01) << "seed " << s;  // E[CKA] ~ d/n-ish for independent data
  }
}

TEST(Cka, LargeMeanDoesNotCancel) {
  // Features with a mean 1e4 times their spread: the first-chunk shift keeps the centring exact.
  const int n = 2000, d = 12;
  MatRF X = random_features(n, d, 9, 0.f), Y = random_features(n, d, 10, 0.f);
  Y += X;
  const double base = linear_cka(X.data(), Y.data(), n, d, d);
  MatRF Xo = X.array() + 1e4f;
  CkaAccumulator acc(d, d);
  for (int i = 0; i < n; i += 500) acc.add(Xo.data() + size_t(i) * d, Y.data() + size_t(i) * d, 500);
  EXPECT_NEAR(acc.value(), base, 1e-3);  // fp32 offset rounding of Xo itself is the limit here
}

TEST(Cka, Errors) {
  CkaAccumulator acc(4, 3);
  EXPECT_SPEAR_ERROR(acc.value(), "at least 2 rows");
  std::vector<float> x(4, 1.f), y(3, 2.f);
  acc.add(x.data(), y.data(), 1);
  EXPECT_SPEAR_ERROR(acc.value(), "at least 2 rows");
  acc.add(x.data(), y.data(), 1);
  EXPECT_EQ(acc.value(), 0.0);  // constant features: no variance
  EXPECT_SPEAR_ERROR(CkaAccumulator(0, 3), "bad feature sizes");
  x[2] = NAN;
  EXPECT_SPEAR_ERROR(acc.add(x.data(), y.data(), 1), "non-finite");
}

}  // namespace
}  // namespace spear
