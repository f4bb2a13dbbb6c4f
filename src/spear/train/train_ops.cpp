#include "spear/train/train_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

// GCC 12 flags Eigen's AVX-512 pexp (array .exp()) as reading an uninitialized register: a false positive,
// like the -Wmaybe-uninitialized ones the top-level CMakeLists silences.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <Eigen/Core>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace spear::train {

namespace {
using MatR = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<MatR>;
using MapC = Eigen::Map<const MatR>;
using Strided = Eigen::Map<const MatR, 0, Eigen::OuterStride<>>;
using StridedOut = Eigen::Map<MatR, 0, Eigen::OuterStride<>>;
using ArrMap = Eigen::Map<Eigen::ArrayXf>;
using ArrMapC = Eigen::Map<const Eigen::ArrayXf>;
using ArrR = Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr int kRowBlock = 64;          // attention query rows per work item (as the inference kernel)
constexpr int64_t kEltChunk = 1 << 14;  // element-wise ops: elements per work item (x16: chunks stay aligned)
}  // namespace

// ---------------------------------------------------------------- RMSNorm

void rms_norm_forward(const float* x, const float* w, int T, int d, float eps, float* y, float* inv) {
  cpu_rms_norm_f32(x, w, T, d, eps, y);  // the inference kernel, so the forward matches it bit for bit
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + size_t(t) * d;
    float ss = 0.f;
    for (int i = 0; i < d; ++i) ss += xr[i] * xr[i];
    inv[t] = 1.f / std::sqrt(ss / float(d) + eps);
  }
}

void rms_norm_backward(const float* x, const float* w, const float* inv, const float* dy, int T, int d, float* dx) {
  // y_j = w_j x_j r, r = (mean(x²) + eps)^-1/2, ∂r/∂x_j = -r³ x_j / d:
  // dx_j = r w_j dy_j - (r³ / d) x_j Σ_i w_i dy_i x_i.
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + size_t(t) * d;
    const float* g = dy + size_t(t) * d;
    float* o = dx + size_t(t) * d;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int i = 0; i < d; ++i) dot += w[i] * g[i] * xr[i];
    const float r = inv[t];
    const float c = r * r * r * dot / float(d);
#pragma omp simd
    for (int i = 0; i < d; ++i) o[i] += r * w[i] * g[i] - c * xr[i];
  }
}

// ---------------------------------------------------------------- Linear

void linear_backward_input(const float* dy, int T, int n, const float* w, int k, float* dx, bool accumulate) {
  MapC DY(dy, T, n), W(w, n, k);
  Map DX(dx, T, k);
  if (accumulate) DX.noalias() += DY * W;
  else DX.noalias() = DY * W;
}

// ---------------------------------------------------------------- RoPE

RopeCache make_rope_cache(const std::vector<float>& inv_freq, int max_pos) {
  RopeCache rc;
  rc.half = int(inv_freq.size());
  rc.cos.resize(size_t(max_pos) * rc.half);
  rc.sin.resize(size_t(max_pos) * rc.half);
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < rc.half; ++i) {
      const float ang = float(p) * inv_freq[size_t(i)];  // as cpu_rope_f32 / HF: fp32 product, then cos/sin
      rc.cos[size_t(p) * rc.half + i] = std::cos(ang);
      rc.sin[size_t(p) * rc.half + i] = std::sin(ang);
    }
  return rc;
}

void rope_apply(float* x, int T, int n_heads, int head_dim, const int32_t* pos, const RopeCache& rc, bool inverse) {
  const int half = head_dim / 2;
  if (half != rc.half) fail("rope_apply: head_dim {} does not match the RoPE table ({} frequencies)", head_dim, rc.half);
  const float sign = inverse ? -1.f : 1.f;  // rotation by -angle is the transpose
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* cs = rc.cos.data() + size_t(pos[t]) * half;
    const float* sn = rc.sin.data() + size_t(pos[t]) * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (size_t(t) * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half], s = sign * sn[i];
        v[i] = a * cs[i] - b * s;
        v[i + half] = b * cs[i] + a * s;
      }
    }
  }
}

// ---------------------------------------------------------------- attention

namespace {
// Keys visible to query position p: [lo(p), p].
inline int first_key(int p, int window) { return window > 0 ? std::max(0, p - window + 1) : 0; }
}  // namespace

void attention_forward(const float* q, const float* k, const float* v, const std::vector<SeqRange>& seqs,
                       const AttentionShape& s, float* out, float* lse) {
  const int hd = s.hd, qd = s.n_heads * hd, kvd = s.n_kv * hd, group = s.n_heads / s.n_kv;
  struct Item {
    int seq, blk, head;
  };
  std::vector<Item> items;
  for (int si = 0; si < int(seqs.size()); ++si)
    for (int b = 0; b < (seqs[size_t(si)].len + kRowBlock - 1) / kRowBlock; ++b)
      for (int h = 0; h < s.n_heads; ++h) items.push_back({si, b, h});
#pragma omp parallel
  {
    MatR S;
#pragma omp for schedule(dynamic)
    for (size_t it = 0; it < items.size(); ++it) {
      const SeqRange& sq = seqs[size_t(items[it].seq)];
      const int h = items[it].head, kvh = h / group;
      const int r0 = items[it].blk * kRowBlock, nr = std::min(kRowBlock, sq.len - r0);
      const int k_lo = first_key(r0, s.window), nk = r0 + nr - k_lo;
      Strided Q(q + size_t(sq.begin + r0) * qd + h * hd, nr, hd, Eigen::OuterStride<>(qd));
      Strided K(k + size_t(sq.begin + k_lo) * kvd + kvh * hd, nk, hd, Eigen::OuterStride<>(kvd));
      Strided V(v + size_t(sq.begin + k_lo) * kvd + kvh * hd, nk, hd, Eigen::OuterStride<>(kvd));
      S.resize(nr, nk);
      S.noalias() = (Q * K.transpose()) * s.scale;
      for (int i = 0; i < nr; ++i) {
        const int p = r0 + i, a = first_key(p, s.window) - k_lo, b = p - k_lo;  // visible columns [a, b]
        auto row = S.row(i).array();
        const float mx = row.segment(a, b - a + 1).maxCoeff();
        row.segment(a, b - a + 1) = (row.segment(a, b - a + 1) - mx).exp();
        const float sum = row.segment(a, b - a + 1).sum();
        row.head(a).setZero();
        row.tail(nk - 1 - b).setZero();
        row.segment(a, b - a + 1) *= 1.f / sum;
        lse[size_t(sq.begin + p) * s.n_heads + h] = mx + std::log(sum);
      }
      StridedOut O(out + size_t(sq.begin + r0) * qd + h * hd, nr, hd, Eigen::OuterStride<>(qd));
      O.noalias() = S * V;
    }
  }
}

void attention_backward(const float* q, const float* k, const float* v, const float* lse, const float* dout,
                        const std::vector<SeqRange>& seqs, const AttentionShape& s, float* dq, float* dk, float* dv) {
  const int hd = s.hd, qd = s.n_heads * hd, kvd = s.n_kv * hd, group = s.n_heads / s.n_kv;
  // One work item per (sequence, KV head): it alone writes that head's dK, dV rows and its query heads' dQ.
  const int n_items = int(seqs.size()) * s.n_kv;
#pragma omp parallel
  {
    MatR P, dP;
#pragma omp for schedule(dynamic)
    for (int it = 0; it < n_items; ++it) {
      const SeqRange& sq = seqs[size_t(it / s.n_kv)];
      const int kvh = it % s.n_kv;
      StridedOut dK(dk + size_t(sq.begin) * kvd + kvh * hd, sq.len, hd, Eigen::OuterStride<>(kvd));
      StridedOut dV(dv + size_t(sq.begin) * kvd + kvh * hd, sq.len, hd, Eigen::OuterStride<>(kvd));
      dK.setZero();
      dV.setZero();
      for (int h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int r0 = 0; r0 < sq.len; r0 += kRowBlock) {
          const int nr = std::min(kRowBlock, sq.len - r0);
          const int k_lo = first_key(r0, s.window), nk = r0 + nr - k_lo;
          Strided Q(q + size_t(sq.begin + r0) * qd + h * hd, nr, hd, Eigen::OuterStride<>(qd));
          Strided dO(dout + size_t(sq.begin + r0) * qd + h * hd, nr, hd, Eigen::OuterStride<>(qd));
          Strided K(k + size_t(sq.begin + k_lo) * kvd + kvh * hd, nk, hd, Eigen::OuterStride<>(kvd));
          Strided V(v + size_t(sq.begin + k_lo) * kvd + kvh * hd, nk, hd, Eigen::OuterStride<>(kvd));
          P.resize(nr, nk);
          dP.resize(nr, nk);
          P.noalias() = (Q * K.transpose()) * s.scale;  // recomputed scores
          dP.noalias() = dO * V.transpose();
          for (int i = 0; i < nr; ++i) {
            const int p = r0 + i, a = first_key(p, s.window) - k_lo, b = p - k_lo;
            const float l = lse[size_t(sq.begin + p) * s.n_heads + h];
            auto pr = P.row(i).array();
            auto dr = dP.row(i).array();
            pr.segment(a, b - a + 1) = (pr.segment(a, b - a + 1) - l).exp();
            pr.head(a).setZero();
            pr.tail(nk - 1 - b).setZero();
            // softmax backward: dS = P ⊙ (dP - Σ_j P dP); the scale of the scores folds in here.
            const float D = (pr.segment(a, b - a + 1) * dr.segment(a, b - a + 1)).sum();
            dr = pr * (dr - D) * s.scale;
          }
          dV.middleRows(k_lo, nk).noalias() += P.transpose() * dO;
          StridedOut dQ(dq + size_t(sq.begin + r0) * qd + h * hd, nr, hd, Eigen::OuterStride<>(qd));
          dQ.noalias() = dP * K;
          dK.middleRows(k_lo, nk).noalias() += dP.transpose() * Q;
        }
    }
  }
}

// ---------------------------------------------------------------- SwiGLU

void swiglu_forward(const float* g, const float* u, int64_t n, float* y) {
  const int64_t chunks = (n + kEltChunk - 1) / kEltChunk;
#pragma omp parallel for if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kEltChunk, m = std::min(kEltChunk, n - b);
    ArrMapC G(g + b, m), U(u + b, m);
    ArrMap(y + b, m) = G / (1.f + (-G).exp()) * U;
  }
}

void swiglu_backward(const float* g, const float* u, const float* dy, int64_t n, float* dg, float* du) {
  const int64_t chunks = (n + kEltChunk - 1) / kEltChunk;
#pragma omp parallel for if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kEltChunk, m = std::min(kEltChunk, n - b);
    ArrMapC G(g + b, m), U(u + b, m), DY(dy + b, m);
    const Eigen::ArrayXf sig = 1.f / (1.f + (-G).exp());
    // silu = g σ, silu' = σ (1 + g (1 - σ))
    ArrMap(dg + b, m) = DY * U * sig * (1.f + G * (1.f - sig));
    ArrMap(du + b, m) = DY * G * sig;
  }
}

// ---------------------------------------------------------------- error compensator

void ec_forward(const Compensator& c, const float* x, int T, float* y, EcSaved& s) {
  const int r = c.rank, h = c.gate_width;
  MapC X(x, T, c.in), A(c.A.data(), r, c.in), B(c.B.data(), c.out, r);
  s.z.resize(size_t(T) * r);
  Map Z(s.z.data(), T, r);
  Z.noalias() = X * A.transpose();
  Map Y(y, T, c.out);
  if (!c.gated()) {
    Y.noalias() += Z * B.transpose();
    return;
  }
  MapC W1(c.W1.data(), h, r), W2(c.W2.data(), r, h);
  Eigen::Map<const Eigen::RowVectorXf> b1(c.b1.data(), h), b2(c.b2.data(), r);
  s.u.resize(size_t(T) * h);
  s.th.resize(size_t(T) * r);
  Map U(s.u.data(), T, h), TH(s.th.data(), T, r);
  U.noalias() = Z * W1.transpose();
  U.rowwise() += b1;
  const MatR act = (U.array() / (1.f + (-U.array()).exp())).matrix();
  TH.noalias() = act * W2.transpose();
  TH.rowwise() += b2;
  TH = TH.array().tanh().matrix();
  // With W2 = b2 = 0, th == 0 and 1 + th == 1 exactly, so Z ⊙ gate == Z: the static result bit for bit.
  const MatR M = (Z.array() * (1.f + TH.array())).matrix();
  Y.noalias() += M * B.transpose();
}

void ec_backward(const Compensator& c, const float* x, int T, const EcSaved& s, const float* dy, float* dA, float* dB,
                 float* dW1, float* db1, float* dW2, float* db2, float* dx) {
  const int r = c.rank, h = c.gate_width;
  MapC X(x, T, c.in), A(c.A.data(), r, c.in), B(c.B.data(), c.out, r), DY(dy, T, c.out), Z(s.z.data(), T, r);
  Map gA(dA, r, c.in), gB(dB, c.out, r);
  MatR dZ;
  if (!c.gated()) {
    gB.noalias() += DY.transpose() * Z;
    dZ.noalias() = DY * B;
  } else {
    MapC U(s.u.data(), T, h), TH(s.th.data(), T, r), W1(c.W1.data(), h, r), W2(c.W2.data(), r, h);
    const MatR M = (Z.array() * (1.f + TH.array())).matrix();
    gB.noalias() += DY.transpose() * M;
    const MatR dM = DY * B;  // [T, r]
    dZ = (dM.array() * (1.f + TH.array())).matrix();
    // g = 1 + tanh(s): ds = dM ⊙ z ⊙ (1 - th²)
    const MatR dS = (dM.array() * Z.array() * (1.f - TH.array().square())).matrix();
    const ArrR sig = 1.f / (1.f + (-U.array()).exp());
    const MatR act = (U.array() * sig).matrix();
    Map(dW2, r, h).noalias() += dS.transpose() * act;
    Eigen::Map<Eigen::RowVectorXf>(db2, r) += dS.colwise().sum();
    MatR dU = dS * W2;  // [T, h], then through silu
    dU = (dU.array() * sig * (1.f + U.array() * (1.f - sig))).matrix();
    Map(dW1, h, r).noalias() += dU.transpose() * Z;
    Eigen::Map<Eigen::RowVectorXf>(db1, h) += dU.colwise().sum();
    dZ.noalias() += dU * W1;
  }
  gA.noalias() += dZ.transpose() * X;
  if (dx) Map(dx, T, c.in).noalias() += dZ * A;
}

// ---------------------------------------------------------------- distillation loss

double kl_loss(const float* hs, const float* ht, const float* head, int T, int d, int V, double grad_scale, float* dhs) {
  // Rows in chunks, one chunk per thread at a time: student and teacher rows stacked into one GEMM so the
  // head [V, d] is packed once per chunk; logits live only in the chunk's buffer [2·rows, V].
  constexpr int kRows = 128;
  const int n_chunks = (T + kRows - 1) / kRows;
  MapC E(head, V, d);
  std::vector<double> chunk_kl(size_t(n_chunks), 0.0);  // summed in order afterwards: reproducible
#pragma omp parallel
  {
    MatR Hc, L;
    Eigen::Array<float, 1, Eigen::Dynamic> Pr(V);  // p of one row
#pragma omp for schedule(dynamic)
    for (int c = 0; c < n_chunks; ++c) {
      const int t0 = c * kRows, n = std::min(kRows, T - t0);
      Hc.resize(2 * n, d);
      Hc.topRows(n) = MapC(hs + size_t(t0) * d, n, d);
      Hc.bottomRows(n) = MapC(ht + size_t(t0) * d, n, d);
      L.resize(2 * n, V);
      L.noalias() = Hc * E.transpose();
      for (int i = 0; i < n; ++i) {
        auto ls = L.row(i).array();
        auto lt = L.row(n + i).array();
        const float ms = ls.maxCoeff(), mt = lt.maxCoeff();
        const float lse_s = ms + std::log((ls - ms).exp().sum());
        const float lse_t = mt + std::log((lt - mt).exp().sum());
        lt -= lse_t;  // log p
        ls -= lse_s;  // log q
        Pr = lt.exp();
        const float* lp = L.row(n + i).data();
        const float* lq = L.row(i).data();
        const float* pr = Pr.data();
        double kl = 0;  // fp64: the per-row KL is a small difference of O(1) terms
        for (int j = 0; j < V; ++j) kl += double(pr[j]) * (double(lp[j]) - double(lq[j]));
        chunk_kl[size_t(c)] += kl;
        if (dhs) ls = (ls.exp() - Pr) * float(grad_scale);  // (q - p) · scale
      }
      if (dhs) Map(dhs + size_t(t0) * d, n, d).noalias() = L.topRows(n) * E;
    }
  }
  double total = 0;
  for (double v : chunk_kl) total += v;
  return total;
}

}  // namespace spear::train
