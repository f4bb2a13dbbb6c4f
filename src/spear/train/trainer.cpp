#include "spear/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>
#include <random>

#include "core/error.h"
#include "spear/train/train_decoder.h"

namespace spear {

float scheduled_lr(const TrainOptions& o, float lr, int step) {
  if (o.warmup > 0 && step < o.warmup) return lr * float(step + 1) / float(o.warmup);
  if (o.schedule == "constant") return lr;
  if (o.schedule != "cosine") fail("train: unknown learning-rate schedule '{}' (cosine | constant)", o.schedule);
  const int span = std::max(1, o.steps - std::max(0, o.warmup));
  const double t = double(step - std::max(0, o.warmup)) / double(span);
  return float(lr * 0.5 * (1.0 + std::cos(std::numbers::pi * std::clamp(t, 0.0, 1.0))));
}

namespace {

// One trained parameter array with its Adam moments.
struct AdamParam {
  std::vector<float>* p = nullptr;
  std::vector<float>* g = nullptr;
  std::vector<float> m, v;
  bool gate = false, decay = false;
};

}  // namespace

TrainReport train_compensators(const TrainWeights& w, std::vector<Compensator*> ecs,
                               const std::vector<std::vector<int32_t>>& seqs, const std::vector<float>& teacher_hidden,
                               const TrainOptions& o) {
  const int H = w.cfg.hidden_size;
  if (seqs.empty()) fail("train_compensators: no sequences");
  if (ecs.empty()) fail("train_compensators: no compensators to train");
  const size_t len = seqs[0].size();
  for (const auto& s : seqs)
    if (s.size() != len) fail("train_compensators: sequences of {} and {} tokens (all must be equal)", len, s.size());
  if (teacher_hidden.size() != seqs.size() * len * size_t(H))
    fail("train_compensators: teacher_hidden has {} values, expected {} sequences x {} tokens x {} hidden",
         teacher_hidden.size(), seqs.size(), len, H);
  if (o.steps < 0 || o.batch_seqs <= 0) fail("train_compensators: bad steps {} / batch_seqs {}", o.steps, o.batch_seqs);
  if (o.schedule != "cosine" && o.schedule != "constant")
    fail("train: unknown learning-rate schedule '{}' (cosine | constant)", o.schedule);

  TrainDecoder dec(w, ecs);
  std::vector<EcGrads> grads(ecs.size());
  std::vector<AdamParam> params;
  for (size_t i = 0; i < ecs.size(); ++i) {
    Compensator& c = *ecs[i];
    EcGrads& g = grads[i];
    g.A.assign(c.A.size(), 0.f), g.B.assign(c.B.size(), 0.f), g.W1.assign(c.W1.size(), 0.f);
    g.b1.assign(c.b1.size(), 0.f), g.W2.assign(c.W2.size(), 0.f), g.b2.assign(c.b2.size(), 0.f);
    auto add = [&](std::vector<float>& p, std::vector<float>& gr, bool gate, bool decay) {
      if (p.empty()) return;
      params.push_back({&p, &gr, std::vector<float>(p.size(), 0.f), std::vector<float>(p.size(), 0.f), gate, decay});
    };
    add(c.A, g.A, false, true);
    add(c.B, g.B, false, true);
    if (o.train_gate && c.gated()) {
      add(c.W1, g.W1, true, true);
      add(c.b1, g.b1, true, false);
      add(c.W2, g.W2, true, true);
      add(c.b2, g.b2, true, false);
    }
  }
  const float lr_gate = o.lr_gate < 0 ? o.lr : o.lr_gate;
  const size_t n = seqs.size();
  const size_t bs = std::min(size_t(o.batch_seqs), n);

  auto gather = [&](const std::vector<size_t>& idx, std::vector<std::vector<int32_t>>& bseqs, std::vector<float>& th) {
    bseqs.clear();
    th.resize(idx.size() * len * H);
    for (size_t j = 0; j < idx.size(); ++j) {
      bseqs.push_back(seqs[idx[j]]);
      std::memcpy(th.data() + j * len * H, teacher_hidden.data() + idx[j] * len * H, len * H * sizeof(float));
    }
  };
  auto full_loss = [&]() {
    double s = 0;
    for (size_t b = 0; b < n; b += bs) {
      const size_t e = std::min(n, b + bs);
      std::vector<std::vector<int32_t>> bseqs(seqs.begin() + long(b), seqs.begin() + long(e));
      s += dec.loss(bseqs, teacher_hidden.data() + b * len * H) * double(e - b);
    }
    return s / double(n);
  };

  TrainReport rep;
  if (o.full_eval) rep.initial_loss = full_loss();

  // Order: a seeded shuffle of all sequences per epoch; a step takes the next bs of them (an epoch's tail
  // continues into the next epoch's order, so every step has bs distinct-or-reshuffled sequences).
  std::mt19937_64 rng(o.seed);
  std::vector<size_t> order;
  size_t cursor = 0;
  auto next_index = [&]() {
    if (cursor == order.size()) {
      order.resize(n);
      for (size_t i = 0; i < n; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      cursor = 0;
    }
    return order[cursor++];
  };

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<size_t> idx(bs);
  std::vector<std::vector<int32_t>> bseqs;
  std::vector<float> th;
  for (int step = 0; step < o.steps; ++step) {
    for (size_t& i : idx) i = next_index();
    gather(idx, bseqs, th);
    for (EcGrads& g : grads) g.zero();
    const double loss = dec.loss_and_grad(bseqs, th.data(), grads);
    rep.loss_per_step.push_back(loss);

    double sq = 0;
    for (const AdamParam& p : params)
      for (float v : *p.g) sq += double(v) * v;
    const double norm = std::sqrt(sq);
    const float clip = (o.grad_clip > 0 && norm > o.grad_clip) ? float(o.grad_clip / norm) : 1.f;
    const float lr_main = scheduled_lr(o, o.lr, step), lr_g = scheduled_lr(o, lr_gate, step);
    const double bc1 = 1.0 - std::pow(double(o.beta1), step + 1), bc2 = 1.0 - std::pow(double(o.beta2), step + 1);
    for (AdamParam& p : params) {
      const float lr = p.gate ? lr_g : lr_main;
      const float step_size = float(lr / bc1), inv_bc2 = float(1.0 / bc2);
      const float wd = p.decay ? lr * o.weight_decay : 0.f;
      float* x = p.p->data();
      const float* g = p.g->data();
      float* m = p.m.data();
      float* v = p.v.data();
      const size_t k = p.p->size();
#pragma omp simd
      for (size_t i = 0; i < k; ++i) {
        const float gi = g[i] * clip;
        m[i] = o.beta1 * m[i] + (1.f - o.beta1) * gi;
        v[i] = o.beta2 * v[i] + (1.f - o.beta2) * gi * gi;
        x[i] -= step_size * m[i] / (std::sqrt(v[i] * inv_bc2) + o.eps) + wd * x[i];
      }
    }
    if (o.on_step) o.on_step(step, loss);
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  rep.tokens_per_second = rep.seconds > 0 ? double(o.steps) * double(bs * len) / rep.seconds : 0;
  if (o.full_eval) {
    rep.final_loss = full_loss();
  } else if (!rep.loss_per_step.empty()) {
    rep.initial_loss = rep.loss_per_step.front();
    rep.final_loss = rep.loss_per_step.back();
  }
  return rep;
}

}  // namespace spear
