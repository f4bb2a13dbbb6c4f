#include "spear/train/train_decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace spear {

using train::AttentionShape;

void EcGrads::zero() {
  for (auto* v : {&A, &B, &W1, &b1, &W2, &b2}) std::fill(v->begin(), v->end(), 0.f);
}

double EcGrads::sq_norm() const {
  double s = 0;
  for (const auto* v : {&A, &B, &W1, &b1, &W2, &b2})
    for (float x : *v) s += double(x) * x;
  return s;
}

namespace {
enum Slot { kQ = 0, kK, kV, kO, kGate, kUp, kDown };

void add_inplace(float* x, const float* y, size_t n) {
#pragma omp parallel for simd if (n > 65536)
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}
}  // namespace

TrainDecoder::TrainDecoder(const TrainWeights& w, std::vector<Compensator*> ecs) : w_(w), ecs_(std::move(ecs)) {
  const int L = w.cfg.num_layers;
  ec_at_.assign(size_t(L), {});
  for (auto& a : ec_at_) a.fill(-1);
  lowest_ = L;
  for (size_t i = 0; i < ecs_.size(); ++i) {
    const Compensator& c = *ecs_[i];
    c.validate();
    int l = 0, s = 0;
    if (!w.locate(c.module, l, s)) fail("TrainDecoder: compensator module '{}' is not a linear of the model", c.module);
    const TrainLinear& lin = w.layers[size_t(l)].linear(s);
    if (c.in != lin.in || c.out != lin.out)
      fail("TrainDecoder: compensator '{}' is {}x{} (out x in), the linear is {}x{}", c.module, c.out, c.in, lin.out,
           lin.in);
    if (ec_at_[size_t(l)][size_t(s)] >= 0) fail("TrainDecoder: two compensators on '{}'", c.module);
    ec_at_[size_t(l)][size_t(s)] = int(i);
    lowest_ = std::min(lowest_, l);
  }
  ec_saved_.resize(ecs_.size());
}

void TrainDecoder::prepare(const std::vector<std::vector<int32_t>>& seqs) {
  const ModelConfig& c = w_.cfg;
  if (seqs.empty()) fail("TrainDecoder: empty batch");
  tokens_.clear();
  pos_.clear();
  ranges_.clear();
  int max_len = 0;
  for (const auto& s : seqs) {
    if (s.empty()) fail("TrainDecoder: empty sequence in the batch");
    ranges_.push_back({int(tokens_.size()), int(s.size())});
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] < 0 || s[i] >= c.vocab_size) fail("token id {} is outside the vocabulary [0, {})", s[i], c.vocab_size);
      tokens_.push_back(s[i]);
      pos_.push_back(int32_t(i));
    }
    max_len = std::max(max_len, int(s.size()));
  }
  T_ = int(tokens_.size());
  if (max_len > rope_len_) {
    rope_ = train::make_rope_cache(w_.rope.inv_freq, max_len);
    rope_len_ = max_len;
  }
}

void TrainDecoder::linear_forward(int l, int slot, const float* in, float* out) {
  const TrainLinear& lin = w_.layers[size_t(l)].linear(slot);
  cpu_linear_f32(in, T_, lin.in, lin.w.data(), lin.bias.empty() ? nullptr : lin.bias.data(), lin.out, out);
  const int e = ec_at_[size_t(l)][size_t(slot)];
  if (e >= 0) train::ec_forward(*ecs_[size_t(e)], in, T_, out, ec_saved_[size_t(e)]);
}

void TrainDecoder::layer_forward(int l, LayerActs& a) {
  const ModelConfig& c = w_.cfg;
  const TrainLayer& L = w_.layers[size_t(l)];
  const int T = T_, H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const float eps = float(c.rms_norm_eps);
  auto sz = [&](train::FloatBuf& v, int cols) { v.resize(size_t(T) * cols); };
  sz(a.x, H), sz(a.h, H), sz(a.q, qd), sz(a.k, kvd), sz(a.v, kvd), sz(a.att, qd), sz(a.lse, c.num_heads);
  sz(a.xm, H), sz(a.h2, H), sz(a.gate, I), sz(a.up, I), sz(a.act, I), sz(a.inv1, 1), sz(a.inv2, 1);

  std::memcpy(a.x.data(), x_.data(), x_.size() * sizeof(float));
  train::rms_norm_forward(x_.data(), L.attn_norm.data(), T, H, eps, a.h.data(), a.inv1.data());
  linear_forward(l, kQ, a.h.data(), a.q.data());
  linear_forward(l, kK, a.h.data(), a.k.data());
  linear_forward(l, kV, a.h.data(), a.v.data());
  train::rope_apply(a.q.data(), T, c.num_heads, c.head_dim, pos_.data(), rope_, false);
  train::rope_apply(a.k.data(), T, c.num_kv_heads, c.head_dim, pos_.data(), rope_, false);
  AttentionShape as{c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window[size_t(l)],
                    1.f / std::sqrt(float(c.head_dim))};
  train::attention_forward(a.q.data(), a.k.data(), a.v.data(), ranges_, as, a.att.data(), a.lse.data());
  linear_forward(l, kO, a.att.data(), tmp_.data());
  add_inplace(x_.data(), tmp_.data(), x_.size());

  std::memcpy(a.xm.data(), x_.data(), x_.size() * sizeof(float));
  train::rms_norm_forward(x_.data(), L.mlp_norm.data(), T, H, eps, a.h2.data(), a.inv2.data());
  linear_forward(l, kGate, a.h2.data(), a.gate.data());
  linear_forward(l, kUp, a.h2.data(), a.up.data());
  train::swiglu_forward(a.gate.data(), a.up.data(), int64_t(T) * I, a.act.data());
  linear_forward(l, kDown, a.act.data(), tmp_.data());
  add_inplace(x_.data(), tmp_.data(), x_.size());
}

void TrainDecoder::forward(bool save) {
  const ModelConfig& c = w_.cfg;
  const int H = c.hidden_size;
  x_.resize(size_t(T_) * H);
  tmp_.resize(size_t(T_) * H);
  for (int t = 0; t < T_; ++t)
    std::memcpy(x_.data() + size_t(t) * H, w_.embed.data() + size_t(tokens_[size_t(t)]) * H, H * sizeof(float));
  // Saved activations only for the layers the backward visits; the others share one scratch set (acts_[0],
  // which is a visited layer's only when the lowest EC layer is 0, and then every layer is saved).
  acts_.resize(save ? size_t(c.num_layers) : 1);
  for (int l = 0; l < c.num_layers; ++l)
    layer_forward(l, (save && l >= lowest_) ? acts_[size_t(l)] : acts_[0]);
  hf_.resize(x_.size());
  inv_f_.resize(size_t(T_));
  train::rms_norm_forward(x_.data(), w_.final_norm.data(), T_, H, float(c.rms_norm_eps), hf_.data(), inv_f_.data());
}

std::vector<float> TrainDecoder::forward_logits(const std::vector<std::vector<int32_t>>& seqs) {
  prepare(seqs);
  forward(false);
  const ModelConfig& c = w_.cfg;
  std::vector<float> logits(size_t(T_) * c.vocab_size);
  cpu_linear_f32(hf_.data(), T_, c.hidden_size, w_.head(), nullptr, c.vocab_size, logits.data());
  return logits;
}

double TrainDecoder::loss(const std::vector<std::vector<int32_t>>& seqs, const float* teacher_hidden) {
  prepare(seqs);
  forward(false);
  const ModelConfig& c = w_.cfg;
  return train::kl_loss(hf_.data(), teacher_hidden, w_.head(), T_, c.hidden_size, c.vocab_size, 0.0, nullptr) / T_;
}

double TrainDecoder::loss_and_grad(const std::vector<std::vector<int32_t>>& seqs, const float* teacher_hidden,
                                   std::vector<EcGrads>& grads) {
  if (grads.size() != ecs_.size()) {
    if (!grads.empty()) fail("loss_and_grad: {} gradient sets for {} compensators", grads.size(), ecs_.size());
    grads.resize(ecs_.size());
  }
  for (size_t i = 0; i < ecs_.size(); ++i) {
    const Compensator& c = *ecs_[i];
    EcGrads& g = grads[i];
    auto fit = [&](std::vector<float>& v, const std::vector<float>& p, const char* what) {
      if (v.empty()) v.assign(p.size(), 0.f);
      else if (v.size() != p.size())
        fail("loss_and_grad: gradient {} of '{}' has {} values, the compensator {}", what, c.module, v.size(), p.size());
    };
    fit(g.A, c.A, "A"), fit(g.B, c.B, "B"), fit(g.W1, c.W1, "W1"), fit(g.b1, c.b1, "b1"), fit(g.W2, c.W2, "W2"),
        fit(g.b2, c.b2, "b2");
  }
  prepare(seqs);
  forward(true);
  const ModelConfig& c = w_.cfg;
  train::FloatBuf& dhf = grad_.dhf;
  dhf.resize(size_t(T_) * c.hidden_size);
  const double sum = train::kl_loss(hf_.data(), teacher_hidden, w_.head(), T_, c.hidden_size, c.vocab_size,
                                    1.0 / T_, ecs_.empty() ? nullptr : dhf.data());
  if (!ecs_.empty()) backward(dhf.data(), grads);
  return sum / T_;
}

void TrainDecoder::ec_backward(int l, int slot, const float* in, const float* dy, std::vector<EcGrads>& grads,
                               float* dx) {
  const int e = ec_at_[size_t(l)][size_t(slot)];
  if (e < 0) return;
  EcGrads& g = grads[size_t(e)];
  train::ec_backward(*ecs_[size_t(e)], in, T_, ec_saved_[size_t(e)], dy, g.A.data(), g.B.data(), g.W1.data(),
                     g.b1.data(), g.W2.data(), g.b2.data(), dx);
}

void TrainDecoder::backward(const float* dhf, std::vector<EcGrads>& grads) {
  const ModelConfig& c = w_.cfg;
  const int T = T_, H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  // Gradient buffers are members, so steps reuse their pages. dx: d(residual stream), walking down the layers.
  GradBufs& b = grad_;
  b.dx.assign(size_t(T) * H, 0.f);
  for (auto [v, n] : {std::pair{&b.dh, H}, {&b.ds, I}, {&b.dgate, I}, {&b.dup, I}, {&b.datt, qd}, {&b.dq, qd},
                      {&b.dk, kvd}, {&b.dv, kvd}})
    v->resize(size_t(T) * n);
  auto &dx = b.dx, &dh = b.dh, &ds = b.ds, &dgate = b.dgate, &dup = b.dup, &datt = b.datt, &dq = b.dq, &dk = b.dk,
       &dv = b.dv;
  train::rms_norm_backward(x_.data(), w_.final_norm.data(), inv_f_.data(), dhf, T, H, dx.data());

  for (int l = c.num_layers - 1; l >= lowest_; --l) {
    const TrainLayer& L = w_.layers[size_t(l)];
    const LayerActs& a = acts_[size_t(l)];
    const auto& ec = ec_at_[size_t(l)];
    // Which gradients this layer must produce: below = the residual input's (layers under it hold ECs).
    const bool below = l > lowest_;
    const bool need_qkv = below || ec[kQ] >= 0 || ec[kK] >= 0 || ec[kV] >= 0;  // d(q, k, v outputs)
    const bool need_xm = need_qkv || ec[kO] >= 0;                                // d(residual after attention)
    const bool need_mlp_in = need_xm || ec[kGate] >= 0 || ec[kUp] >= 0;         // d(gate, up outputs)

    // MLP: x_out = xm + down(silu(gate(h2)) ⊙ up(h2)), h2 = rmsnorm(xm). dx is d x_out here.
    if (need_mlp_in) train::linear_backward_input(dx.data(), T, H, L.down.w.data(), I, ds.data(), false);
    ec_backward(l, kDown, a.act.data(), dx.data(), grads, need_mlp_in ? ds.data() : nullptr);
    if (!need_mlp_in) break;
    train::swiglu_backward(a.gate.data(), a.up.data(), ds.data(), int64_t(T) * I, dgate.data(), dup.data());
    if (need_xm) {
      train::linear_backward_input(dgate.data(), T, I, L.gate.w.data(), H, dh.data(), false);
      train::linear_backward_input(dup.data(), T, I, L.up.w.data(), H, dh.data(), true);
    }
    ec_backward(l, kGate, a.h2.data(), dgate.data(), grads, need_xm ? dh.data() : nullptr);
    ec_backward(l, kUp, a.h2.data(), dup.data(), grads, need_xm ? dh.data() : nullptr);
    if (!need_xm) break;
    train::rms_norm_backward(a.xm.data(), L.mlp_norm.data(), a.inv2.data(), dh.data(), T, H, dx.data());

    // Attention: xm = x + o(attn(rope(q(h)), rope(k(h)), v(h))), h = rmsnorm(x). dx is d xm here.
    if (need_qkv) train::linear_backward_input(dx.data(), T, H, L.o.w.data(), qd, datt.data(), false);
    ec_backward(l, kO, a.att.data(), dx.data(), grads, need_qkv ? datt.data() : nullptr);
    if (!need_qkv) break;
    AttentionShape as{c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window[size_t(l)],
                      1.f / std::sqrt(float(c.head_dim))};
    train::attention_backward(a.q.data(), a.k.data(), a.v.data(), a.lse.data(), datt.data(), ranges_, as, dq.data(),
                              dk.data(), dv.data());
    train::rope_apply(dq.data(), T, c.num_heads, c.head_dim, pos_.data(), rope_, true);
    train::rope_apply(dk.data(), T, c.num_kv_heads, c.head_dim, pos_.data(), rope_, true);
    if (below) {
      train::linear_backward_input(dq.data(), T, qd, L.q.w.data(), H, dh.data(), false);
      train::linear_backward_input(dk.data(), T, kvd, L.k.w.data(), H, dh.data(), true);
      train::linear_backward_input(dv.data(), T, kvd, L.v.w.data(), H, dh.data(), true);
    }
    ec_backward(l, kQ, a.h.data(), dq.data(), grads, below ? dh.data() : nullptr);
    ec_backward(l, kK, a.h.data(), dk.data(), grads, below ? dh.data() : nullptr);
    ec_backward(l, kV, a.h.data(), dv.data(), grads, below ? dh.data() : nullptr);
    if (!below) break;
    train::rms_norm_backward(a.x.data(), L.attn_norm.data(), a.inv1.data(), dh.data(), T, H, dx.data());
  }
}

}  // namespace spear
