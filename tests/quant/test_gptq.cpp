// GPTQ: the blocked implementation against a plain unblocked fp64 reference written here, its advantage over
// RTN on the layer-output error, its reduction to RTN for a diagonal Hessian, edge cases, determinism, the
// Hessian accumulator, and a timing print.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <Eigen/Dense>
#include <gtest/gtest.h>
#include <omp.h>

#include "quant/gptq.h"
#include "quant/quantizer.h"
#include "test_util.h"

namespace spear {
namespace {

using MatD = Eigen::MatrixXd;

// ---------------------------------------------------------------------------------------------------------
// Problems: W [out, in] ~ N(0, 1) with a few outliers; X [N, in] = Z M + 0.1 Z2 with Z [N, in/4] so the
// inputs are strongly correlated (H far from diagonal, nearly low rank), columns rescaled by exp(N(0, .5)) so
// diag(H) varies (act-order has something to do).
struct Problem {
  int out = 0, in = 0, n = 0;
  std::vector<float> w;  // [out, in]
  std::vector<float> x;  // [n, in]
  std::vector<double> H; // [in, in] = 2/N X^T X
};

Problem make_problem(int out, int in, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Problem P;
  P.out = out, P.in = in, P.n = n;
  P.w.resize(size_t(out) * in);
  for (auto& v : P.w) v = float(nd(rng) * 0.05);
  for (int k = 0; k < out; ++k) P.w[rng() % P.w.size()] *= 6.f;  // outliers
  const int k = std::max(2, in / 4);
  MatD M(k, in), Z(n, k), Z2(n, in);
  for (int i = 0; i < M.size(); ++i) M.data()[i] = nd(rng);
  for (int i = 0; i < Z.size(); ++i) Z.data()[i] = nd(rng);
  for (int i = 0; i < Z2.size(); ++i) Z2.data()[i] = nd(rng);
  MatD X = Z * M + 0.1 * Z2;
  for (int c = 0; c < in; ++c) X.col(c) *= std::exp(0.5 * nd(rng));
  P.x.resize(size_t(n) * in);
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < in; ++c) P.x[size_t(t) * in + c] = float(X(t, c));
  long seen = 0;
  accumulate_hessian(P.x.data(), n, in, P.H, seen);
  return P;
}

// ---------------------------------------------------------------------------------------------------------
// The plain reference: column by column, every later column updated at once, fp64, H^-1's upper Cholesky
// factor computed the reference's way (chol -> inverse -> chol). Same conventions as documented in gptq.h:
// per-channel grid from the original row; static groups (act-order) from the dead-zeroed original W; dynamic
// groups (no act-order) from the current weights when the group's first column is reached.
QuantizedMatrix naive_gptq(const float* w, int out, int in, const double* Hin, const QuantParams& p,
                           const GptqOptions& opt) {
  const int n = in, G = p.groups(in), glen = p.group_len(in), maxq = p.max_q();
  const bool grouped = p.group_size > 0;
  MatD H(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) H(i, j) = Hin[size_t(i) * n + j];
  std::vector<bool> dead(n);
  for (int i = 0; i < n; ++i)
    if (H(i, i) == 0) dead[i] = true, H(i, i) = 1;
  std::vector<int> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order) std::stable_sort(perm.begin(), perm.end(), [&](int a, int b) { return H(a, a) > H(b, b); });
  MatD Hp(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) Hp(i, j) = H(perm[i], perm[j]);
  Hp.diagonal().array() += opt.damp * Hp.diagonal().mean();
  MatD Hinv = Hp.llt().solve(MatD::Identity(n, n));
  MatD U = Hinv.llt().matrixU();

  QuantizedMatrix m;
  m.out = out, m.in = in, m.params = p;
  m.q.resize(size_t(out) * in);
  m.scales.resize(size_t(out) * G);
  m.zeros.resize(size_t(out) * G);
  std::vector<QuantGrid> grid(size_t(out) * G);
  std::vector<float> buf(n);
  for (int r = 0; r < out; ++r) {
    if (!grouped) grid[r] = find_grid(w + size_t(r) * in, in, 1, p);
    if (grouped && opt.act_order) {
      for (int c = 0; c < n; ++c) buf[c] = dead[c] ? 0.f : w[size_t(r) * in + c];
      for (int g = 0; g < G; ++g) grid[size_t(r) * G + g] = find_grid(&buf[g * glen], std::min(glen, n - g * glen), 1, p);
    }
  }
  MatD W(out, n);
  for (int r = 0; r < out; ++r)
    for (int k = 0; k < n; ++k) W(r, k) = dead[perm[k]] ? 0.0 : double(w[size_t(r) * in + perm[k]]);
  for (int i = 0; i < n; ++i) {
    if (grouped && !opt.act_order && i % glen == 0) {
      const int len = std::min(glen, n - i);
      for (int r = 0; r < out; ++r) {
        for (int c = 0; c < len; ++c) buf[c] = float(W(r, i + c));
        grid[size_t(r) * G + i / glen] = find_grid(buf.data(), len, 1, p);
      }
    }
    const int col = perm[i];
    const int g = !grouped ? 0 : (opt.act_order ? col / glen : i / glen);
    for (int r = 0; r < out; ++r) {
      const QuantGrid& gr = grid[size_t(r) * G + g];
      const int q = quantize_value(float(W(r, i)), gr, maxq);
      m.q[size_t(r) * in + col] = uint8_t(q);
      const double err = (W(r, i) - double((float(q) - float(gr.zero)) * gr.scale)) / U(i, i);
      for (int j = i + 1; j < n; ++j) W(r, j) -= err * U(i, j);
    }
  }
  for (size_t i = 0; i < grid.size(); ++i) m.scales[i] = grid[i].scale, m.zeros[i] = uint8_t(grid[i].zero);
  return m;
}

// ‖(W − Q) Xᵀ‖² = N/2 · Σ_r δ_rᵀ H δ_r.
double output_error(const Problem& P, const QuantizedMatrix& m) {
  const std::vector<float> dq = m.dequantize();
  MatD D(P.out, P.in);
  for (int r = 0; r < P.out; ++r)
    for (int c = 0; c < P.in; ++c) D(r, c) = double(P.w[size_t(r) * P.in + c]) - double(dq[size_t(r) * P.in + c]);
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> H(P.H.data(), P.in, P.in);
  return 0.5 * P.n * (D * H * D.transpose()).trace();
}

bool identical(const QuantizedMatrix& a, const QuantizedMatrix& b) {
  return a.q == b.q && a.zeros == b.zeros && a.scales.size() == b.scales.size() &&
         std::memcmp(a.scales.data(), b.scales.data(), a.scales.size() * sizeof(float)) == 0;
}

std::string describe(const QuantParams& p, const GptqOptions& o) {
  return "bits=" + std::to_string(p.bits) + " group=" + std::to_string(p.group_size) + (p.symmetric ? " sym" : "") +
         (o.act_order ? " act_order" : "") + " block=" + std::to_string(o.block_size) + " damp=" + std::to_string(o.damp);
}

// ---------------------------------------------------------------------------------------------------------
// 1. Blocked == unblocked. Both are fp64; they differ only by the order of the fp64 updates (the lazy batch
// GEMM vs one column at a time) and by how U is computed (reversed Cholesky + triangular inverse vs
// chol -> inverse -> chol), i.e. by ~1e-13 relative. An integer can only differ when w/scale falls within
// that distance of a rounding tie (x.5), which for random data essentially never happens; when it does, the
// flipped column's error is fed back differently and a few later values in that row may flip too -- hence
// the >99.9% criterion rather than exact equality.
TEST(Gptq, BlockedMatchesNaive) {
  struct Shape { int out, in; };
  const Shape shapes[] = {{16, 40}, {32, 100}, {64, 200}, {48, 131}};
  size_t total = 0, flips = 0, compared = 0;
  double worst_rel = 0;
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    const Problem P = make_problem(s.out, s.in, 3 * s.in, seed++);
    for (int bits : {3, 4}) {
      for (int group : {-1, 32, 24}) {
        for (bool sym : {false, true}) {
          for (bool act : {false, true}) {
            QuantParams p;
            p.bits = bits, p.group_size = group, p.symmetric = sym;
            GptqOptions naive_opt;
            naive_opt.act_order = act;
            const QuantizedMatrix ref = naive_gptq(P.w.data(), s.out, s.in, P.H.data(), p, naive_opt);
            const std::vector<float> ref_dq = ref.dequantize();
            for (int block : {16, 32, 128}) {
              GptqOptions o = naive_opt;
              o.block_size = block;
              const QuantizedMatrix m = gptq_quantize(P.w.data(), s.out, s.in, P.H.data(), p, o);
              const std::vector<float> dq = m.dequantize();
              size_t f = 0;
              for (size_t i = 0; i < m.q.size(); ++i) {
                if (m.q[i] != ref.q[i]) {
                  ++f;
                  continue;
                }
                const int r = int(i / s.in);
                const double sc = ref.scales[size_t(r) * p.groups(s.in) + (i % s.in) / p.group_len(s.in)];
                const double rel = std::abs(double(dq[i]) - ref_dq[i]) / (std::abs(double(ref_dq[i])) + sc);
                worst_rel = std::max(worst_rel, rel);
                ++compared;
              }
              EXPECT_LE(f, m.q.size() / 1000) << s.out << "x" << s.in << " " << describe(p, o);
              flips += f;
              total += m.q.size();
            }
          }
        }
      }
    }
  }
  std::printf("[naive vs blocked] %zu ints compared, %zu differ; worst relative dequant difference %.3g\n", total,
              flips, worst_rel);
  EXPECT_LE(worst_rel, 1e-5);
  EXPECT_LE(flips * 1000, total);
}

// The naive reference is itself sensitive: a wrong update sign or a missing lazy update must show up. Sanity
// check that the comparison above can fail: GPTQ with a diagonal-only H (= RTN) differs from the naive result
// on the correlated problem in far more than 0.1% of the entries.
TEST(Gptq, NaiveComparisonCanFail) {
  const Problem P = make_problem(32, 100, 300, 77);
  QuantParams p;
  p.bits = 3;
  GptqOptions o;
  o.act_order = false;
  const QuantizedMatrix ref = naive_gptq(P.w.data(), P.out, P.in, P.H.data(), p, o);
  const QuantizedMatrix rtn = rtn_quantize(P.w.data(), P.out, P.in, p);
  size_t f = 0;
  for (size_t i = 0; i < rtn.q.size(); ++i) f += rtn.q[i] != ref.q[i];
  EXPECT_GT(f * 1000, rtn.q.size() * 10);
}

// ---------------------------------------------------------------------------------------------------------
// 2. GPTQ beats RTN on the layer-output error, act-order no worse than without on average.
TEST(Gptq, BeatsRtnOnOutputError) {
  for (int bits : {3, 4}) {
    for (int group : {-1, 32}) {
      QuantParams p;
      p.bits = bits, p.group_size = group;
      double sum_rtn = 0, sum_plain = 0, sum_act = 0;
      for (uint64_t seed = 100; seed < 104; ++seed) {
        const Problem P = make_problem(96, 256, 1024, seed);
        const double e_rtn = output_error(P, rtn_quantize(P.w.data(), P.out, P.in, p));
        GptqOptions o;
        o.act_order = false;
        const double e_plain = output_error(P, gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o));
        o.act_order = true;
        const double e_act = output_error(P, gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o));
        EXPECT_LE(e_plain, 0.8 * e_rtn) << "seed " << seed << " " << describe(p, o);
        EXPECT_LE(e_act, 0.8 * e_rtn) << "seed " << seed << " " << describe(p, o);
        sum_rtn += e_rtn, sum_plain += e_plain, sum_act += e_act;
      }
      std::printf("[output error] bits=%d group=%d: gptq/rtn = %.3f, gptq+act_order/rtn = %.3f\n", bits, group,
                  sum_plain / sum_rtn, sum_act / sum_rtn);
      EXPECT_LE(sum_act, sum_plain) << "bits " << bits << " group " << group;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// 3. Diagonal Hessian, no act-order: GPTQ is RTN (same ints, scales, zeros). Also with act-order when the
// diagonal is constant (the stable sort keeps the order).
TEST(Gptq, DiagonalHessianIsRtn) {
  const Problem P = make_problem(40, 120, 8, 5);
  std::vector<double> Hid(size_t(P.in) * P.in, 0.0), Hdiag(size_t(P.in) * P.in, 0.0);
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<double> ud(0.1, 10.0);
  for (int i = 0; i < P.in; ++i) {
    Hid[size_t(i) * P.in + i] = 3.5;
    Hdiag[size_t(i) * P.in + i] = ud(rng);
  }
  for (int bits = 2; bits <= 8; ++bits) {
    for (int group : {-1, 32, 24, 7}) {
      for (bool sym : {false, true}) {
        QuantParams p;
        p.bits = bits, p.group_size = group, p.symmetric = sym;
        const QuantizedMatrix rtn = rtn_quantize(P.w.data(), P.out, P.in, p);
        GptqOptions o;
        o.act_order = false;
        for (int block : {16, 128}) {
          o.block_size = block;
          EXPECT_TRUE(identical(gptq_quantize(P.w.data(), P.out, P.in, Hid.data(), p, o), rtn)) << describe(p, o);
          EXPECT_TRUE(identical(gptq_quantize(P.w.data(), P.out, P.in, Hdiag.data(), p, o), rtn)) << describe(p, o);
        }
        o.act_order = true;
        EXPECT_TRUE(identical(gptq_quantize(P.w.data(), P.out, P.in, Hid.data(), p, o), rtn)) << describe(p, o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// 4. Edge cases: dead columns, damping, groups that do not divide `in`, symmetric, bits 2..8; determinism
// (two runs, and 1 vs 2 threads, byte-identical); errors.
TEST(Gptq, EdgeCasesAndDeterminism) {
  Problem P = make_problem(70, 150, 400, 11);
  // Dead inputs: zero columns 0, 17, 149 of X and recompute H.
  const int dead_cols[] = {0, 17, 149};
  for (int t = 0; t < P.n; ++t)
    for (int c : dead_cols) P.x[size_t(t) * P.in + c] = 0.f;
  long seen = 0;
  P.H.clear();
  accumulate_hessian(P.x.data(), P.n, P.in, P.H, seen);
  for (int c : dead_cols) ASSERT_EQ(P.H[size_t(c) * P.in + c], 0.0);

  for (int bits = 2; bits <= 8; ++bits) {
    for (int group : {-1, 7, 33, 64, 150, 200}) {
      for (bool sym : {false, true}) {
        for (bool act : {false, true}) {
          for (double damp : {0.01, 0.1, 1.0}) {
            QuantParams p;
            p.bits = bits, p.group_size = group, p.symmetric = sym;
            GptqOptions o;
            o.act_order = act, o.damp = damp, o.block_size = 32;
            const QuantizedMatrix m = gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o);
            ASSERT_EQ(m.q.size(), size_t(P.out) * P.in);
            ASSERT_EQ(m.scales.size(), size_t(P.out) * p.groups(P.in));
            bool ok = true;
            for (uint8_t q : m.q) ok &= q <= p.max_q();
            for (uint8_t z : m.zeros) ok &= z <= p.max_q();
            for (float s : m.scales) ok &= std::isfinite(s) && s > 0;
            EXPECT_TRUE(ok) << describe(p, o);
            const std::vector<float> dq = m.dequantize();
            for (int r = 0; r < P.out; ++r)
              for (int c : dead_cols) EXPECT_EQ(dq[size_t(r) * P.in + c], 0.f) << describe(p, o);
            for (float v : dq) ASSERT_TRUE(std::isfinite(v));
          }
        }
      }
    }
  }
  // Determinism: repeated runs and thread counts.
  QuantParams p;
  p.group_size = 32;
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    const QuantizedMatrix a = gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o);
    const QuantizedMatrix b = gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o);
    EXPECT_TRUE(identical(a, b));
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const QuantizedMatrix c = gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o);
    omp_set_num_threads(3);
    const QuantizedMatrix d = gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), p, o);
    omp_set_num_threads(threads);
    EXPECT_TRUE(identical(a, c));
    EXPECT_TRUE(identical(a, d));
  }
  // Errors: bad parameters; a singular Hessian without damping.
  QuantParams bad;
  bad.bits = 9;
  EXPECT_SPEAR_ERROR(gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), bad), "bits");
  bad.bits = 4, bad.group_size = 0;
  EXPECT_SPEAR_ERROR(gptq_quantize(P.w.data(), P.out, P.in, P.H.data(), bad), "group size");
  std::vector<double> Hsing(size_t(P.in) * P.in, 1.0);  // rank 1
  GptqOptions nodamp;
  nodamp.damp = 0;
  EXPECT_SPEAR_ERROR(gptq_quantize(P.w.data(), P.out, P.in, Hsing.data(), p, nodamp), "positive definite");
}

// ---------------------------------------------------------------------------------------------------------
// 5. accumulate_hessian over uneven batches == 2/N X^T X computed directly.
TEST(Gptq, AccumulateHessian) {
  const int in = 300, n = 1000;  // in > one 128-wide tile, not a multiple of it
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(size_t(n) * in);
  for (auto& v : x) v = nd(rng) + (&v - x.data()) % in * 0.01f;  // non-zero means: correlated
  std::vector<double> H;
  long seen = 0;
  const int batches[] = {1, 0, 7, 128, 300, 64, 500};
  int t0 = 0;
  for (int b : batches) {
    accumulate_hessian(x.data() + size_t(t0) * in, b, in, H, seen);
    t0 += b;
  }
  ASSERT_EQ(t0, n);
  ASSERT_EQ(seen, n);
  double worst = 0;
  for (int a = 0; a < in; ++a)
    for (int b = 0; b < in; ++b) {
      long double s = 0;
      for (int t = 0; t < n; ++t) s += (long double)x[size_t(t) * in + a] * x[size_t(t) * in + b];
      const double ref = double(2.0L * s / n);
      const double scale = std::sqrt(double(H[size_t(a) * in + a]) * H[size_t(b) * in + b]);
      worst = std::max(worst, std::abs(H[size_t(a) * in + b] - ref) / scale);
      ASSERT_EQ(H[size_t(a) * in + b], H[size_t(b) * in + a]);
    }
  std::printf("[hessian] worst relative difference vs direct: %.3g\n", worst);
  EXPECT_LE(worst, 1e-12);
  // A mismatched H is an error; n_seen == 0 starts over.
  EXPECT_SPEAR_ERROR(accumulate_hessian(x.data(), 4, in - 1, H, seen), "expected");
  long zero = 0;
  accumulate_hessian(x.data(), 4, in - 1, H, zero);
  EXPECT_EQ(H.size(), size_t(in - 1) * (in - 1));
}

// ---------------------------------------------------------------------------------------------------------
// 6. Timing (printed, not asserted): the reference model's largest layer shapes.
TEST(Gptq, Timing) {
  for (auto [out, in] : {std::pair{512, 1536}, std::pair{1536, 512}}) {
    const Problem P = make_problem(out, in, 2 * in, 21);
    for (int group : {-1, 128}) {
      QuantParams p;
      p.group_size = group;
      GptqOptions o;
      const auto t0 = std::chrono::steady_clock::now();
      const QuantizedMatrix m = gptq_quantize(P.w.data(), out, in, P.H.data(), p, o);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("[timing] %dx%d group=%d act_order: %.1f ms (%d threads)\n", out, in, group, ms,
                  omp_get_max_threads());
      EXPECT_EQ(m.q.size(), size_t(out) * in);
    }
    std::vector<double> H;
    long seen = 0;
    const auto t0 = std::chrono::steady_clock::now();
    accumulate_hessian(P.x.data(), P.n, in, H, seen);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[timing] accumulate_hessian %d tokens x %d: %.1f ms\n", P.n, in, ms);
  }
}

}  // namespace
}  // namespace spear
