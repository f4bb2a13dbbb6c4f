// The deferred EC's launches (ec_after_gemm.h) against a double-precision reference: z = A·x, the gate and the term
// B·(g ⊙ z) in double, then the kernels' bf16 roundings (y' = bf16(y + term); with the norm, x += y' and RMSNorm).
// Every case's term moves the outputs by far more than the tolerance, so a kernel that dropped it, applied it twice
// or mixed up columns, tokens or compensators fails.
#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_after_gemm.h"
#include "core/dtype.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

using Buf16 = w4test::W4DevBuf<uint16_t>;
using Buf32 = w4test::W4DevBuf<float>;

__nv_bfloat16* bfp(const Buf16& b) { return reinterpret_cast<__nv_bfloat16*>(b.get()); }

std::vector<uint16_t> bf16_values(size_t n, std::mt19937& rng, float mean, float sd) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = f32_to_bf16(mean + sd * nd(rng));
  return v;
}

std::vector<float> f32_values(size_t n, std::mt19937& rng, float sd) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& e : v) e = sd * nd(rng);
  return v;
}

// A random compensator for n outputs over k inputs, on the host and on the device.
struct TestEc {
  int n, k, rank, gw;
  std::vector<uint16_t> A, B;
  std::vector<float> W1, b1, W2, b2;
  std::unique_ptr<Buf16> dA, dB;
  std::unique_ptr<Buf32> dW1, db1, dW2, db2;

  TestEc(int n_, int k_, int rank_, int gw_, std::mt19937& rng) : n(n_), k(k_), rank(rank_), gw(gw_) {
    A = bf16_values(size_t(rank) * k, rng, 0.f, 2.f / std::sqrt(float(k)));
    B = bf16_values(size_t(n) * rank, rng, 0.f, 0.3f / std::sqrt(float(rank)));
    W1 = f32_values(size_t(gw) * rank, rng, 1.f / std::sqrt(float(rank)));
    b1 = f32_values(size_t(gw), rng, 0.1f);
    W2 = f32_values(size_t(rank) * gw, rng, 1.f / std::sqrt(float(std::max(gw, 1))));
    b2 = f32_values(size_t(rank), rng, 0.1f);
    dA = std::make_unique<Buf16>(A), dB = std::make_unique<Buf16>(B);
    dW1 = std::make_unique<Buf32>(W1), db1 = std::make_unique<Buf32>(b1);
    dW2 = std::make_unique<Buf32>(W2), db2 = std::make_unique<Buf32>(b2);
  }

  cuda::EcTermArgs args(const Buf16& xin) const {
    cuda::EcTermArgs e;
    e.rank = rank, e.gate_width = gw, e.k = k;
    e.xin = bfp(xin), e.A = bfp(*dA), e.B = bfp(*dB);
    if (gw > 0) e.W1 = dW1->get(), e.b1 = db1->get(), e.W2 = dW2->get(), e.b2 = db2->get();
    return e;
  }

  // term[t][col] = B·(g ⊙ A·x) of token t, in double.
  std::vector<double> term(const std::vector<uint16_t>& xin, int rows) const {
    std::vector<double> out(size_t(rows) * n);
    for (int t = 0; t < rows; ++t) {
      const size_t R = static_cast<size_t>(rank), G = static_cast<size_t>(gw);
      std::vector<double> z(R), gz(R), hid(G);
      for (int i = 0; i < rank; ++i)
        for (int kk = 0; kk < k; ++kk)
          z[size_t(i)] += double(bf16_to_f32(A[size_t(i) * k + kk])) * bf16_to_f32(xin[size_t(t) * k + kk]);
      for (int j = 0; j < gw; ++j) {
        double s = b1[size_t(j)];
        for (int i = 0; i < rank; ++i) s += double(W1[size_t(j) * rank + i]) * z[size_t(i)];
        hid[size_t(j)] = s / (1.0 + std::exp(-s));
      }
      for (int i = 0; i < rank; ++i) {
        double u = b2[size_t(i)];
        for (int j = 0; j < gw; ++j) u += double(W2[size_t(i) * gw + j]) * hid[size_t(j)];
        gz[size_t(i)] = (gw > 0 ? 1.0 + std::tanh(u) : 1.0) * z[size_t(i)];
      }
      for (int col = 0; col < n; ++col) {
        double d = 0;
        for (int i = 0; i < rank; ++i) d += double(bf16_to_f32(B[size_t(col) * rank + i])) * gz[size_t(i)];
        out[size_t(t) * n + col] = d;
      }
    }
    return out;
  }
};

// ||got - ref|| / ||ref|| over bf16 bits against floats.
double rel_l2(const std::vector<uint16_t>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = bf16_to_f32(got[i]);
    num += (g - ref[i]) * (g - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

// The norm launch: shapes that take clusters of 2 and 8 CTAs (1B's o_proj and down_proj: one and two k-groups per
// thread), ranks 8 and 16, static and gated, 1 to 32 tokens.
TEST(CudaEcAfterGemm, NormLaunchMatchesReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    int rows, d, rank, gw, k;
  };
  std::mt19937 rng(11);
  for (const Case c : {Case{1, 2048, 16, 8, 2048}, Case{3, 896, 8, 0, 4096}, Case{8, 3072, 16, 8, 8192},
                       Case{32, 4096, 16, 64, 14336}, Case{2, 8192, 16, 12, 8192}, Case{5, 1040, 8, 3, 1088}}) {
    const std::string tag = std::to_string(c.rows) + "x" + std::to_string(c.d) + " rank " + std::to_string(c.rank) +
                            " gate " + std::to_string(c.gw) + " k " + std::to_string(c.k);
    const size_t n = size_t(c.rows) * c.d;
    const TestEc ec(c.d, c.k, c.rank, c.gw, rng);
    const std::vector<uint16_t> xb = bf16_values(n, rng, 0.f, 1.f), yb = bf16_values(n, rng, 0.f, 1.f),
                                wb = bf16_values(size_t(c.d), rng, 1.f, 0.1f),
                                xin = bf16_values(size_t(c.rows) * c.k, rng, 0.f, 1.f);
    const std::vector<double> term = ec.term(xin, c.rows);
    std::vector<float> xr(n), outr(n), x0(n);
    for (int t = 0; t < c.rows; ++t) {
      double ss = 0;
      for (int col = 0; col < c.d; ++col) {
        const size_t e = size_t(t) * c.d + col;
        const float yv = bf16_to_f32(f32_to_bf16(bf16_to_f32(yb[e]) + float(term[e])));
        xr[e] = bf16_to_f32(f32_to_bf16(bf16_to_f32(xb[e]) + yv));
        x0[e] = bf16_to_f32(f32_to_bf16(bf16_to_f32(xb[e]) + bf16_to_f32(yb[e])));
        ss += double(xr[e]) * xr[e];
      }
      const double inv = 1.0 / std::sqrt(ss / c.d + 1e-5);
      for (int col = 0; col < c.d; ++col) {
        const size_t e = size_t(t) * c.d + col;
        outr[e] = float(bf16_to_f32(wb[size_t(col)]) * (xr[e] * inv));
      }
    }
    Buf16 dx(xb), dy(yb), dw(wb), dxin(xin), dout(n);
    SPEAR_CUDA_CHECK(cudaMemset(dout.get(), 0xff, n * 2));  // poison: every element must be written
    const cuda::EcTermArgs args = ec.args(dxin);
    ASSERT_TRUE(cuda::add_rms_norm_ec_takes(c.d, args, dx.get(), dy.get(), dw.get(), dout.get())) << tag;
    cuda::add_rms_norm_ec_bf16(bfp(dx), bfp(dy), args, bfp(dw), bfp(dout), c.rows, c.d, 1e-5f, nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> gx = dx.download(), go = dout.download();
    for (size_t e = 0; e < n; ++e) ASSERT_TRUE(std::isfinite(bf16_to_f32(go[e]))) << tag << ": " << e << " not written";
    // x: only where an fp32 sum lands on the other side of a bf16 rounding; out: plus its own rounding.
    EXPECT_LT(rel_l2(gx, xr), 2e-3) << tag;
    EXPECT_LT(rel_l2(go, outr), 5e-3) << tag;
    double moved = 0, den = 0;
    for (size_t e = 0; e < n; ++e) moved += double(x0[e] - xr[e]) * (x0[e] - xr[e]), den += double(xr[e]) * xr[e];
    EXPECT_GT(std::sqrt(moved / den), 5e-2) << tag << ": the EC term must move x well beyond the tolerance";
  }
}

// The launch of its own, as for a q/k/v-like group (one x, outputs of different widths) and a single linear:
// y' = bf16(y + term) for every compensator and token. Also the shapes it refuses.
TEST(CudaEcAfterGemm, ApplyLaunchMatchesReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    int rows, k, rank;
    std::vector<int> n, gw;
  };
  std::mt19937 rng(21);
  for (const Case& c :
       {Case{1, 2048, 16, {2048, 512, 512}, {8, 8, 0}}, Case{8, 3072, 8, {3072, 1024, 1024}, {4, 0, 64}},
        Case{5, 2048, 16, {8192, 8192}, {8, 8}}, Case{32, 4096, 16, {14336}, {8}}, Case{3, 1088, 8, {1040}, {3}}}) {
    const int count = int(c.n.size());
    std::ostringstream what;
    what << c.rows << " tokens, k " << c.k << ", rank " << c.rank << ", n";
    for (int v : c.n) what << ' ' << v;
    const std::string tag = what.str();
    const std::vector<uint16_t> xin = bf16_values(size_t(c.rows) * c.k, rng, 0.f, 1.f);
    Buf16 dxin(xin);
    std::vector<std::unique_ptr<TestEc>> ecs;
    std::vector<std::vector<uint16_t>> y0;
    std::vector<std::unique_ptr<Buf16>> dy;
    cuda::EcTermArgs args[cuda::kEcApplyMax];
    __nv_bfloat16* yp[cuda::kEcApplyMax];
    for (int i = 0; i < count; ++i) {
      ecs.push_back(std::make_unique<TestEc>(c.n[size_t(i)], c.k, c.rank, c.gw[size_t(i)], rng));
      y0.push_back(bf16_values(size_t(c.rows) * c.n[size_t(i)], rng, 0.f, 1.f));
      dy.push_back(std::make_unique<Buf16>(y0.back()));
      args[i] = ecs.back()->args(dxin);
      yp[i] = bfp(*dy.back());
    }
    ASSERT_TRUE(cuda::ec_apply_takes(count, c.n.data(), args, yp)) << tag;
    cuda::ec_apply_bf16(count, c.n.data(), args, yp, c.rows, nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < count; ++i) {
      const std::vector<double> term = ecs[size_t(i)]->term(xin, c.rows);
      std::vector<float> ref(term.size()), unchanged(term.size());
      for (size_t e = 0; e < term.size(); ++e) {
        unchanged[e] = bf16_to_f32(y0[size_t(i)][e]);
        ref[e] = bf16_to_f32(f32_to_bf16(unchanged[e] + float(term[e])));
      }
      const std::vector<uint16_t> got = dy[size_t(i)]->download();
      EXPECT_LT(rel_l2(got, ref), 2e-3) << tag << ", compensator " << i;
      EXPECT_GT(rel_l2(got, unchanged), 5e-2) << tag << ", compensator " << i << ": the term did not land";
    }
  }
  // Refused: rank 24, a width that no cluster divides, compensators over different inputs.
  Buf16 x1(std::vector<uint16_t>(2048)), x2(std::vector<uint16_t>(2048)), y(std::vector<uint16_t>(4096));
  TestEc r24(2048, 2048, 24, 8, rng), r16(2048, 2048, 16, 8, rng), odd(2044, 2048, 16, 8, rng);
  __nv_bfloat16* ys[2] = {bfp(y), bfp(y)};
  const int n1[1] = {2048}, n2[2] = {2048, 2048}, nodd[1] = {2044};
  cuda::EcTermArgs a24 = r24.args(x1), aodd = odd.args(x1), pair[2] = {r16.args(x1), r16.args(x2)};
  EXPECT_FALSE(cuda::ec_apply_takes(1, n1, &a24, ys));
  EXPECT_FALSE(cuda::ec_apply_takes(1, nodd, &aodd, ys));
  EXPECT_FALSE(cuda::ec_apply_takes(2, n2, pair, ys));
}

}  // namespace spear
