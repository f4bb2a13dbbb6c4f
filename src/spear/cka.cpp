#include "spear/cka.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace spear {

namespace {
using MatRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRF = Eigen::Map<const MatRF>;

// ‖Cᵀ C‖ style terms only need the lower triangle of the symmetric Gram matrices.
Eigen::MatrixXd full_from_lower(const Eigen::MatrixXd& lower) {
  Eigen::MatrixXd m = lower.selfadjointView<Eigen::Lower>();
  return m;
}
}  // namespace

CkaAccumulator::CkaAccumulator(int dx, int dy) : dx_(dx), dy_(dy) {
  if (dx <= 0 || dy <= 0) fail("CkaAccumulator: bad feature sizes dx={} dy={}", dx, dy);
  sum_x_ = Eigen::VectorXd::Zero(dx);
  sum_y_ = Eigen::VectorXd::Zero(dy);
  xx_ = MatD::Zero(dx, dx);
  yy_ = MatD::Zero(dy, dy);
  yx_ = MatD::Zero(dy, dx);
}

void CkaAccumulator::add(const float* X, const float* Y, int rows) {
  if (rows < 0) fail("CkaAccumulator::add: negative row count {}", rows);
  if (rows == 0) return;
  if (!X || !Y) fail("CkaAccumulator::add: null input");
  // Column-major fp64 copies [rows, d]: the GEMMs below are then plain XᵀX on contiguous columns.
  MatD x = MapRF(X, rows, dx_).cast<double>();
  MatD y = MapRF(Y, rows, dy_).cast<double>();
  if (n_ == 0) {
    shift_x_ = x.colwise().mean().transpose();
    shift_y_ = y.colwise().mean().transpose();
  }
  x.rowwise() -= shift_x_.transpose();
  y.rowwise() -= shift_y_.transpose();
  if (!x.allFinite() || !y.allFinite()) fail("CkaAccumulator::add: non-finite value in the {} new rows", rows);
  sum_x_ += x.colwise().sum().transpose();
  sum_y_ += y.colwise().sum().transpose();
  xx_.selfadjointView<Eigen::Lower>().rankUpdate(x.transpose());
  yy_.selfadjointView<Eigen::Lower>().rankUpdate(y.transpose());
  yx_.noalias() += y.transpose() * x;
  n_ += rows;
}

double CkaAccumulator::value() const {
  if (n_ < 2) fail("CKA needs at least 2 rows, have {}", n_);
  const double inv_n = 1.0 / double(n_);
  // Centring at the end: Xcᵀ Xc = XᵀX − Σx Σxᵀ / n, and likewise for the other two.
  const MatD cxx = full_from_lower(xx_) - inv_n * sum_x_ * sum_x_.transpose();
  const MatD cyy = full_from_lower(yy_) - inv_n * sum_y_ * sum_y_.transpose();
  const MatD cyx = yx_ - inv_n * sum_y_ * sum_x_.transpose();
  const double den = cxx.norm() * cyy.norm();
  if (!(den > 0)) return 0.0;  // a constant representation carries no information
  return std::clamp(cyx.squaredNorm() / den, 0.0, 1.0);
}

double linear_cka(const float* X, const float* Y, int n, int dx, int dy) {
  CkaAccumulator acc(dx, dy);
  acc.add(X, Y, n);
  return acc.value();
}

}  // namespace spear
