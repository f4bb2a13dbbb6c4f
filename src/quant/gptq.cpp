// GPTQ: see gptq.h for the algorithm's choices. Layout of the work here:
//
//   1. Dead columns (H[i,i] == 0): H[i,i] = 1, W[:, i] = 0. Act-order: columns sorted by descending diag(H)
//      (a stable sort: ties keep their original order). Damping: H += damp * mean(diag(H)) * I.
//   2. U = upper Cholesky factor of H^-1, in fp64. Instead of the reference's chol -> cholesky_inverse ->
//      chol (three O(n^3) steps and an explicit inverse) it uses the identity: with J the reversal
//      permutation and J H J = M M^T (lower Cholesky), H = R R^T with R = J M J upper triangular, so
//      H^-1 = R^-T R^-1 and, by uniqueness of the Cholesky factor, U = R^-1 = J M^-1 J. One Cholesky and one
//      triangular inverse; mathematically the same U (checked against the reference path in the tests).
//   3. Rows are independent given U and the grids, so the output rows are processed in fixed chunks of
//      kRowChunk rows, in parallel. Within a chunk: blocks of block_size columns; each column is quantized,
//      its scaled error err = (w - q) / U[i,i] is applied to the rest of the block at once (rank-1 update) and
//      to the columns after the block in one GEMM when the block ends (the lazy batch update).
//
// Determinism: every Eigen product runs single-threaded (inside an OpenMP region Eigen does not start its
// own threads) on sub-problems whose shapes do not depend on the thread count, so the bytes of the result
// do not depend on it either. The weight being updated is fp64 (the reference: fp32); it is rounded to fp32
// only to meet the grid, where it plays the role of the reference's fp32 W.
#include "quant/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <Eigen/Dense>
#include <omp.h>

#include "core/error.h"

namespace spear {
namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

constexpr int kRowChunk = 64;   // output rows per task in the GPTQ loop
constexpr int kTile = 128;      // tile width of the Cholesky / triangular inverse / X^T X

// In-place blocked lower Cholesky of A (only the lower triangle is read and written). Deterministic and
// parallel: the diagonal block by one thread, the panel by fixed row chunks, the trailing update by fixed
// column tiles. Returns false if A is not (numerically) positive definite.
bool cholesky_lower_inplace(MatD& A) {
  const int n = int(A.rows());
  bool ok = true;
#pragma omp parallel
  {
    for (int k0 = 0; k0 < n; k0 += kTile) {
      const int k1 = std::min(n, k0 + kTile), b = k1 - k0;
#pragma omp single
      {
        MatD d = A.block(k0, k0, b, b);
        Eigen::LLT<MatD> llt(d);
        if (llt.info() != Eigen::Success) {
          ok = false;
        } else {
          A.block(k0, k0, b, b).triangularView<Eigen::Lower>() = llt.matrixL();
        }
      }  // implicit barrier: every thread sees ok
      if (!ok) break;
      // Panel: A21 = A21 * L11^-T.
#pragma omp for schedule(static)
      for (int r0 = k1; r0 < n; r0 += kTile) {
        const int rn = std::min(kTile, n - r0);
        auto panel = A.block(r0, k0, rn, b);
        A.block(k0, k0, b, b).triangularView<Eigen::Lower>().transpose().solveInPlace<Eigen::OnTheRight>(panel);
      }
      // Trailing update: A22 -= A21 A21^T, lower part, one column tile (all rows from its diagonal down) each.
#pragma omp for schedule(dynamic, 1)
      for (int j0 = k1; j0 < n; j0 += kTile) {
        const int jn = std::min(kTile, n - j0);
        A.block(j0, j0, n - j0, jn).noalias() -= A.block(j0, k0, n - j0, b) * A.block(j0, k0, jn, b).transpose();
      }
    }
  }
  return ok;
}

// X = L^-1 for lower triangular L (n x n), by fixed column tiles: tile [c0, c1) of L^-1 is zero above row c0
// and solves L[c0:, c0:] X = I[c0:, c0:c1].
MatD lower_inverse(const MatD& L) {
  const int n = int(L.rows());
  MatD X = MatD::Zero(n, n);
#pragma omp parallel for schedule(dynamic, 1)
  for (int c0 = 0; c0 < n; c0 += kTile) {
    const int cn = std::min(kTile, n - c0), m = n - c0;
    MatD t = MatD::Identity(m, cn);
    L.block(c0, c0, m, m).triangularView<Eigen::Lower>().solveInPlace(t);
    X.block(c0, c0, m, cn) = t;
  }
  return X;
}

void check_params(int out, int in, const QuantParams& p, const GptqOptions& opt) {
  if (out <= 0 || in <= 0) fail("GPTQ: empty matrix [{}, {}]", out, in);
  if (p.bits < 2 || p.bits > 8) fail("bits must be in 2..8, got {}", p.bits);
  if (p.group_size == 0 || p.group_size < -1)
    fail("group size must be -1 (per channel) or positive, got {}", p.group_size);
  if (opt.block_size <= 0) fail("GPTQ: block size must be positive, got {}", opt.block_size);
  if (!(opt.damp >= 0) || !std::isfinite(opt.damp)) fail("GPTQ: damping must be a finite value >= 0, got {}", opt.damp);
}

}  // namespace

QuantizedMatrix gptq_quantize(const float* w, int out, int in, const double* H, const QuantParams& p,
                              const GptqOptions& opt) {
  check_params(out, in, p, opt);
  const int n = in;
  const int G = p.groups(in), glen = p.group_len(in), max_q = p.max_q();
  const bool grouped = p.group_size > 0;
  const bool static_groups = grouped && opt.act_order;
  const bool dynamic_groups = grouped && !opt.act_order;

  // ---- 1. dead columns, permutation, damping
  std::vector<double> diag(n);
  std::vector<char> dead(n, 0);
  for (int i = 0; i < n; ++i) {
    diag[i] = H[size_t(i) * n + i];
    if (!std::isfinite(diag[i]) || diag[i] < 0) fail("GPTQ: Hessian diagonal entry {} is {} (must be finite and >= 0)", i, diag[i]);
    if (diag[i] == 0) {
      dead[i] = 1;
      diag[i] = 1;
    }
  }
  std::vector<int> perm(n);  // processing position -> original column
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order) std::stable_sort(perm.begin(), perm.end(), [&](int a, int b) { return diag[a] > diag[b]; });
  double mean_diag = 0;
  for (int i = 0; i < n; ++i) mean_diag += diag[i];
  mean_diag /= n;
  const double damp = opt.damp * mean_diag;

  // ---- 2. U = upper Cholesky of H^-1 (in processing order), via the reversed Cholesky (see the top).
  MatD U;
  {
    MatD P(n, n);  // P = J Hp J, Hp the permuted, fixed, damped H; only the lower triangle is used
    for (int j = 0; j < n; ++j) {
      const int cj = perm[n - 1 - j];
      for (int i = j; i < n; ++i) {
        const int ci = perm[n - 1 - i];
        P(i, j) = i == j ? diag[ci] + damp : (dead[ci] || dead[cj] ? 0.0 : H[size_t(ci) * n + cj]);
      }
    }
    if (!cholesky_lower_inplace(P))
      fail("GPTQ: the Hessian is not positive definite after damping {} (increase --damp or the calibration data)",
           opt.damp);
    U = lower_inverse(P);
    P.resize(0, 0);
    U.reverseInPlace();  // U(i, j) = M^-1(n-1-i, n-1-j): upper triangular
  }

  QuantizedMatrix m;
  m.out = out;
  m.in = in;
  m.params = p;
  m.q.resize(size_t(out) * in);
  m.scales.resize(size_t(out) * G);
  m.zeros.resize(size_t(out) * G);

  const int B = opt.block_size;
  const int n_chunks = (out + kRowChunk - 1) / kRowChunk;

  // ---- 3. GPTQ over row chunks
#pragma omp parallel for schedule(dynamic, 1)
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const int r0 = chunk * kRowChunk, R = std::min(kRowChunk, out - r0);
    std::vector<QuantGrid> grid(size_t(R) * G);
    std::vector<float> buf(n);

    // Grids fixed up front: per-channel from the original row (the reference finds them before the
    // dead-column fix); static groups from the row with dead columns zeroed, original contiguous columns.
    for (int r = 0; r < R; ++r) {
      const float* row = w + size_t(r0 + r) * in;
      if (!grouped) {
        grid[size_t(r)] = find_grid(row, n, 1, p);  // G == 1
      } else if (static_groups) {
        for (int c = 0; c < n; ++c) buf[c] = dead[c] ? 0.f : row[c];
        for (int g = 0; g < G; ++g) {
          const int c0 = g * glen;
          grid[size_t(r) * G + g] = find_grid(buf.data() + c0, std::min(glen, n - c0), 1, p);
        }
      }
    }

    // The chunk's weights in processing order, fp64, dead columns zeroed.
    MatD W(R, n);
    for (int k = 0; k < n; ++k) {
      const int c = perm[k];
      for (int r = 0; r < R; ++r) W(r, k) = dead[c] ? 0.0 : double(w[size_t(r0 + r) * in + c]);
    }
    MatD Err(R, B);
    MatD cur;  // a group's current weights (dynamic groups)

    for (int i1 = 0; i1 < n; i1 += B) {
      const int i2 = std::min(n, i1 + B), cnt = i2 - i1;
      for (int k = 0; k < cnt; ++k) {
        const int i = i1 + k;
        if (dynamic_groups && i % glen == 0) {
          // The group's weights as updated by every earlier column: those inside the block are current,
          // those after it still miss this block's first k columns.
          const int c1 = std::min(n, i + glen);
          cur = W.middleCols(i, c1 - i);
          if (c1 > i2 && k > 0)
            cur.rightCols(c1 - i2).noalias() -= Err.leftCols(k) * U.block(i1, i2, k, c1 - i2);
          const int g = i / glen;
          for (int r = 0; r < R; ++r) {
            for (int c = 0; c < c1 - i; ++c) buf[c] = float(cur(r, c));
            grid[size_t(r) * G + g] = find_grid(buf.data(), c1 - i, 1, p);
          }
        }
        const int col = perm[i];
        const int g = grouped ? (static_groups ? col / glen : i / glen) : 0;
        const double d = U(i, i);
        for (int r = 0; r < R; ++r) {
          const QuantGrid& gr = grid[size_t(r) * G + g];
          const double wv = W(r, i);
          const int q = quantize_value(float(wv), gr, max_q);
          const float dq = (float(q) - float(gr.zero)) * gr.scale;  // == QuantizedMatrix::dequant
          m.q[size_t(r0 + r) * in + col] = uint8_t(q);
          Err(r, k) = (wv - double(dq)) / d;
        }
        for (int j = i + 1; j < i2; ++j) W.col(j) -= U(i, j) * Err.col(k);
      }
      if (i2 < n) W.rightCols(n - i2).noalias() -= Err.leftCols(cnt) * U.block(i1, i2, cnt, n - i2);
    }

    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) {
        m.scales[size_t(r0 + r) * G + g] = grid[size_t(r) * G + g].scale;
        m.zeros[size_t(r0 + r) * G + g] = uint8_t(grid[size_t(r) * G + g].zero);
      }
  }
  return m;
}

void accumulate_hessian(const float* x, int n_tokens, int in, std::vector<double>& H, long& n_seen) {
  if (in <= 0) fail("accumulate_hessian: in_features must be positive, got {}", in);
  if (n_tokens < 0) fail("accumulate_hessian: negative token count {}", n_tokens);
  if (H.empty() || n_seen <= 0) {
    H.assign(size_t(in) * in, 0.0);
    n_seen = 0;
  } else if (H.size() != size_t(in) * in) {
    fail("accumulate_hessian: H holds {} values, expected {} x {}", H.size(), in, in);
  }
  if (n_tokens == 0) return;
  // X in fp64, column-major [t, in]: products of fp32 values are exact in fp64, the sums accumulate in fp64.
  const MatD X = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(x, n_tokens, in)
                     .cast<double>();
  const double keep = double(n_seen) / double(n_seen + n_tokens);
  const double add = 2.0 / double(n_seen + n_tokens);
#pragma omp parallel for schedule(dynamic, 1)
  for (int c0 = 0; c0 < in; c0 += kTile) {
    const int cn = std::min(kTile, in - c0), c1 = c0 + cn;
    const MatD Gt = X.leftCols(c1).transpose() * X.middleCols(c0, cn);  // (X^T X)[0:c1, c0:c1]
    // This tile owns the entries (a, b) with b in [c0, c1), a <= b, and their mirrors (b, a).
    for (int b = c0; b < c1; ++b)
      for (int a = 0; a <= b; ++a) {
        const double v = H[size_t(a) * in + b] * keep + add * Gt(a, b - c0);
        H[size_t(a) * in + b] = v;
        H[size_t(b) * in + a] = v;
      }
  }
  n_seen += n_tokens;
}

}  // namespace spear
