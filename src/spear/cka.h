#pragma once
// Linear CKA (centred kernel alignment) between two representations of the same samples, the damage measure
// of the placement diagnostic (DESIGN.md §3):
//
//   CKA(X, Y) = ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F)     Xc, Yc: X [n, dx], Y [n, dy] with column means removed
//
// Invariant to orthogonal transforms and isotropic scaling of either side, and to adding a constant row
// vector; in [0, 1]. All statistics are accumulated in fp64.
#include <vector>

#include <Eigen/Core>

namespace spear {

// Streaming form: rows (samples) arrive in chunks, e.g. the final hidden states of one calibration batch at a
// time. Keeps Σx, Σy, XᵀX, YᵀY, YᵀX in fp64: (dx² + dy² + dx·dy) doubles, 6 MiB at dx = dy = 512.
class CkaAccumulator {
 public:
  CkaAccumulator(int dx, int dy);
  // X [rows, dx], Y [rows, dy], row-major; row i of X and row i of Y are the same sample.
  void add(const float* X, const float* Y, int rows);
  // Throws spear::Error with fewer than 2 rows; 0 when either side has no variance.
  double value() const;
  long rows() const { return n_; }
  int dx() const { return dx_; }
  int dy() const { return dy_; }

 private:
  using MatD = Eigen::MatrixXd;
  int dx_, dy_;
  long n_ = 0;
  // Rows are shifted by the first chunk's column means before accumulation (CKA is shift invariant): keeps
  // the final centring XᵀX − n·μμᵀ free of cancellation when the features have large means.
  Eigen::VectorXd shift_x_, shift_y_;
  Eigen::VectorXd sum_x_, sum_y_;  // Σ (x − shift_x), Σ (y − shift_y)
  MatD xx_, yy_, yx_;              // XᵀX [dx, dx] (lower triangle only), YᵀY [dy, dy] (lower), YᵀX [dy, dx]
};

// One-shot CKA of X [n, dx] and Y [n, dy] (row-major).
double linear_cka(const float* X, const float* Y, int n, int dx, int dy);

}  // namespace spear
