#include "spear/compensator.h"

#include <cmath>
#include <random>

#include <Eigen/Core>

#include "core/dtype.h"
#include "core/error.h"

namespace spear {

namespace {
using MatR = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapC = Eigen::Map<const MatR>;

inline float silu(float v) { return v / (1.f + std::exp(-v)); }
}  // namespace

size_t compensator_bytes(int in, int out, int rank, int gate_width) {
  const size_t r = size_t(rank), h = size_t(gate_width);
  size_t n = r * size_t(in) + size_t(out) * r;
  if (h > 0) n += h * r + h + r * h + r;
  return 2 * n;
}

size_t Compensator::param_count() const { return compensator_bytes(in, out, rank, gate_width) / 2; }

void Compensator::resize(int in_, int out_, int rank_, int gate_width_) {
  in = in_, out = out_, rank = rank_, gate_width = gate_width_;
  const size_t r = size_t(rank), h = size_t(gate_width);
  A.assign(r * size_t(in), 0.f);
  B.assign(size_t(out) * r, 0.f);
  W1.assign(h * r, 0.f);
  b1.assign(h, 0.f);
  W2.assign(r * h, 0.f);
  b2.assign(h > 0 ? r : 0, 0.f);
}

void Compensator::init_gate(int width, float w1_std, uint64_t seed) {
  gate_width = width;
  const size_t r = size_t(rank), h = size_t(width);
  W1.assign(h * r, 0.f);
  b1.assign(h, 0.f);
  W2.assign(r * h, 0.f);
  b2.assign(h > 0 ? r : 0, 0.f);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, w1_std);
  for (float& v : W1) v = nd(rng);
}

void Compensator::round_to_bf16() {
  for (auto* v : {&A, &B, &W1, &b1, &W2, &b2})
    for (float& x : *v) x = bf16_to_f32(f32_to_bf16(x));
}

void Compensator::validate() const {
  if (in <= 0 || out <= 0 || rank <= 0 || gate_width < 0)
    fail("compensator {}: bad shape in={} out={} rank={} gate={}", module, in, out, rank, gate_width);
  const size_t r = size_t(rank), h = size_t(gate_width);
  auto check = [&](const std::vector<float>& v, size_t n, const char* what) {
    if (v.size() != n) fail("compensator {}: {} has {} values, expected {}", module, what, v.size(), n);
  };
  check(A, r * size_t(in), "A");
  check(B, size_t(out) * r, "B");
  check(W1, h * r, "W1");
  check(b1, h, "b1");
  check(W2, r * h, "W2");
  check(b2, h > 0 ? r : 0, "b2");
}

void compensator_gate(const Compensator& c, const float* z, float* g) {
  const int r = c.rank, h = c.gate_width;
  if (h == 0) {
    for (int i = 0; i < r; ++i) g[i] = 1.f;
    return;
  }
  float a[256];
  std::vector<float> big;
  float* act = a;
  if (h > 256) {
    big.resize(size_t(h));
    act = big.data();
  }
  for (int j = 0; j < h; ++j) {
    float s = c.b1[size_t(j)];
    const float* w = c.W1.data() + size_t(j) * r;
    for (int i = 0; i < r; ++i) s += w[i] * z[i];
    act[j] = silu(s);
  }
  for (int i = 0; i < r; ++i) {
    float s = c.b2[size_t(i)];
    const float* w = c.W2.data() + size_t(i) * h;
    for (int j = 0; j < h; ++j) s += w[j] * act[j];
    g[i] = 1.f + std::tanh(s);
  }
}

void compensator_project(const Compensator& c, const float* x, int T, float* z) {
  if (T <= 0) return;
  MapC X(x, T, c.in), A(c.A.data(), c.rank, c.in);
  Eigen::Map<MatR> Z(z, T, c.rank);
  Z.noalias() = X * A.transpose();
}

void compensator_expand(const Compensator& c, const float* z_in, int T, float* y) {
  if (T <= 0) return;
  const int r = c.rank;
  MatR z = Eigen::Map<const MatR>(z_in, T, r);
  if (c.gated()) {
    std::vector<float> g(static_cast<size_t>(r));
#pragma omp parallel for if (T > 64) firstprivate(g)
    for (int t = 0; t < T; ++t) {
      float* zr = z.data() + size_t(t) * r;
      compensator_gate(c, zr, g.data());
      for (int i = 0; i < r; ++i) zr[i] *= g[size_t(i)];
    }
  }
  MapC B(c.B.data(), c.out, r);
  Eigen::Map<MatR> Y(y, T, c.out);
  Y.noalias() += z * B.transpose();
}

void compensator_apply(const Compensator& c, const float* x, int T, float* y) {
  if (T <= 0) return;
  std::vector<float> z(size_t(T) * size_t(c.rank));
  compensator_project(c, x, T, z.data());
  compensator_expand(c, z.data(), T, y);
}

void compensator_apply_reference(const Compensator& c, const float* x, int T, float* y) {
  const int r = c.rank, h = c.gate_width;
  std::vector<double> z(static_cast<size_t>(r)), act(static_cast<size_t>(h));
  for (int t = 0; t < T; ++t) {
    const float* xt = x + size_t(t) * c.in;
    for (int i = 0; i < r; ++i) {
      double s = 0;
      for (int j = 0; j < c.in; ++j) s += double(c.A[size_t(i) * c.in + j]) * xt[j];
      z[size_t(i)] = s;
    }
    std::vector<double> g(static_cast<size_t>(r), 1.0);
    if (h > 0) {
      for (int j = 0; j < h; ++j) {
        double s = c.b1[size_t(j)];
        for (int i = 0; i < r; ++i) s += double(c.W1[size_t(j) * r + i]) * z[size_t(i)];
        act[size_t(j)] = s / (1.0 + std::exp(-s));
      }
      for (int i = 0; i < r; ++i) {
        double s = c.b2[size_t(i)];
        for (int j = 0; j < h; ++j) s += double(c.W2[size_t(i) * h + j]) * act[size_t(j)];
        g[size_t(i)] = 1.0 + std::tanh(s);
      }
    }
    for (int o = 0; o < c.out; ++o) {
      double s = 0;
      for (int i = 0; i < r; ++i) s += double(c.B[size_t(o) * r + i]) * g[size_t(i)] * z[size_t(i)];
      y[size_t(t) * c.out + o] += float(s);
    }
  }
}

}  // namespace spear
