#include "spear/diagnose.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "plot/plot.h"
#include "spear/cka.h"
#include "spear/compensator.h"

namespace spear {

namespace {

using clk = std::chrono::steady_clock;

const char* kKinds[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// Row-wise log-softmax of logits [T, V] in place (double accumulation).
void log_softmax_rows(float* x, long T, int V) {
#pragma omp parallel for
  for (long t = 0; t < T; ++t) {
    float* r = x + size_t(t) * V;
    float mx = *std::max_element(r, r + V);
    double s = 0;
    for (int i = 0; i < V; ++i) s += std::exp(double(r[i] - mx));
    const float lse = mx + float(std::log(s));
    for (int i = 0; i < V; ++i) r[i] -= lse;
  }
}

// Median wall time in microseconds of fn() over reps calls.
template <class F>
double time_us(F&& fn, int reps) {
  std::vector<double> t;
  fn();  // warm-up
  for (int i = 0; i < reps; ++i) {
    auto a = clk::now();
    fn();
    t.push_back(std::chrono::duration<double, std::micro>(clk::now() - a).count());
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[size_t(reps / 2)];
}

}  // namespace

Diagnosis diagnose(Model& model, const std::string& model_dir, const std::map<std::string, PackedQuantWeights>& quantized,
                   const std::vector<std::vector<int32_t>>& seqs, const DiagnoseOptions& o) {
  auto t0 = clk::now();
  if (seqs.empty()) fail("diagnose: no calibration sequences");
  const ModelConfig& c = model.config();
  Backend& be = model.backend();
  const int L = c.num_layers, H = c.hidden_size, V = c.vocab_size, len = int(seqs[0].size());
  Batch batch;
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (int(seqs[s].size()) != len) fail("diagnose: calibration sequences must have equal lengths");
    batch.seqs.push_back({int(batch.tokens.size()), len, 0, int(s)});
    batch.tokens.insert(batch.tokens.end(), seqs[s].begin(), seqs[s].end());
  }
  const long T = long(batch.tokens.size());
  auto cache = model.make_kv_cache(int(seqs.size()), len);

  // Full-precision pass: each layer's input, the final hidden states and log-probabilities.
  std::vector<std::vector<float>> layer_in(static_cast<size_t>(L));
  std::vector<float> fp_hidden(size_t(T) * H), cur_hidden(size_t(T) * H);
  auto hidden_tap = [&](std::vector<float>& dst) {
    return TapFn([&be, &dst](const std::string& name, TapPoint pt, const Tensor& t) {
      if (name == "model.norm" && pt == TapPoint::Output) be.download(t, dst.data());
    });
  };
  Tensor x = model.embed(batch);
  for (int l = 0; l < L; ++l) {
    layer_in[size_t(l)].resize(size_t(T) * H);
    be.download(x, layer_in[size_t(l)].data());
    model.run_layer(l, x, batch, *cache);
  }
  TapFn fp_tap = hidden_tap(fp_hidden);
  std::vector<float> fp_logp = model.logits(x, batch, LogitsMode::All, &fp_tap);
  log_softmax_rows(fp_logp.data(), T, V);

  Checkpoint ck(model_dir);
  Diagnosis d;
  d.tokens = T;
  std::vector<std::string> names;
  for (const auto& n : model.linear_names())
    if (quantized.count(n)) names.push_back(n);
  ProgressBar bar("diagnosing modules", long(names.size()));
  TapFn cur_tap = hidden_tap(cur_hidden);
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    ModuleDamage m;
    m.module = name;
    m.layer = std::stoi(name.substr(std::strlen("model.layers.")));
    m.kind = name.substr(name.rfind('.') + 1);
    std::unique_ptr<Linear>& slot = model.linear_slot(name);
    m.out = slot->out_features;
    m.in = slot->in_features;
    std::vector<float> bias;
    if (ck.has(name + ".bias")) bias = ck.get(name + ".bias").to_f32();
    std::unique_ptr<Linear> q = be.make_quant_linear(name, quantized.at(name), bias);
    std::swap(slot, q);
    Tensor xl = be.upload(layer_in[size_t(m.layer)].data(), T, H);
    for (int l = m.layer; l < L; ++l) model.run_layer(l, xl, batch, *cache);
    std::vector<float> logp = model.logits(xl, batch, LogitsMode::All, &cur_tap);
    log_softmax_rows(logp.data(), T, V);

    m.cka = linear_cka(fp_hidden.data(), cur_hidden.data(), int(T), H, H);
    m.damage = std::max(0.0, 1.0 - m.cka);
    double se = 0, ss = 0, kl = 0;
    for (size_t j = 0; j < fp_hidden.size(); ++j) {
      const double e = double(cur_hidden[j]) - fp_hidden[j];
      se += e * e;
      ss += double(fp_hidden[j]) * fp_hidden[j];
    }
#pragma omp parallel for reduction(+ : kl)
    for (long t = 0; t < T; ++t) {
      const float* p = fp_logp.data() + size_t(t) * V;
      const float* qq = logp.data() + size_t(t) * V;
      double s = 0;
      for (int v = 0; v < V; ++v) s += std::exp(double(p[v])) * (double(p[v]) - qq[v]);
      kl += s;
    }
    m.rel_mse = se / std::max(ss, 1e-30);
    m.kl = kl / double(T);
    m.bytes_per_rank = compensator_bytes(m.in, m.out, 1, 0);

    if (o.measure_latency) {
      std::vector<float> xin(size_t(m.in), 0.5f);
      Tensor xt = be.upload(xin.data(), 1, m.in), yt = be.alloc(1, m.out);
      m.linear_us = time_us([&] { be.linear(xt, *slot, yt); }, 31);
      Compensator ec;
      ec.module = name;
      ec.resize(m.in, m.out, o.latency_rank, 0);
      be.set_compensator(*slot, &ec);
      const double with_ec = time_us([&] { be.linear(xt, *slot, yt); }, 31);
      be.set_compensator(*slot, nullptr);
      m.ec_us_per_rank = std::max(0.0, with_ec - m.linear_us) / o.latency_rank;
    }
    std::swap(slot, q);  // restore the full-precision layer
    d.modules.push_back(m);
    bar.update(long(i + 1));
  }
  bar.finish();
  double total = 0;
  for (const auto& m : d.modules) total += m.damage;
  for (const auto& m : d.modules)
    if (total > 0 && m.damage > 0) {
      const double p = m.damage / total;
      d.entropy -= p * std::log(p);
    }
  d.effective_modules = std::exp(d.entropy);
  d.seconds = std::chrono::duration<double>(clk::now() - t0).count();
  return d;
}

nlohmann::json Diagnosis::to_json() const {
  nlohmann::json mods = nlohmann::json::array();
  for (const auto& m : modules)
    mods.push_back({{"module", m.module}, {"layer", m.layer}, {"kind", m.kind}, {"out", m.out}, {"in", m.in},
                    {"cka", m.cka}, {"damage", m.damage}, {"rel_mse", m.rel_mse}, {"kl", m.kl},
                    {"ec_bytes_per_rank", m.bytes_per_rank}, {"linear_us", m.linear_us},
                    {"ec_us_per_rank", m.ec_us_per_rank}});
  return {{"modules", mods}, {"entropy", entropy}, {"effective_modules", effective_modules},
          {"tokens", tokens}, {"seconds", seconds}};
}

std::string format_diagnosis(const Diagnosis& d) {
  int L = 0;
  for (const auto& m : d.modules) L = std::max(L, m.layer + 1);
  std::string s = fmt::format("damage = 1 - CKA of the final hidden states (x1e-4), one module quantized at a time\n{:>6}", "layer");
  for (const char* k : kKinds) s += fmt::format(" {:>10}", k);
  s += "\n";
  for (int l = 0; l < L; ++l) {
    s += fmt::format("{:>6}", l);
    for (const char* k : kKinds) {
      auto it = std::find_if(d.modules.begin(), d.modules.end(), [&](const ModuleDamage& m) { return m.layer == l && m.kind == k; });
      s += it == d.modules.end() ? fmt::format(" {:>10}", "-") : fmt::format(" {:>10.3f}", it->damage * 1e4);
    }
    s += "\n";
  }
  s += fmt::format("entropy H = {:.3f} nats, exp(H) = {:.1f} effective damaged modules of {}; {} tokens, {:.1f} s\n",
                   d.entropy, d.effective_modules, d.modules.size(), d.tokens, d.seconds);
  return s;
}

void plot_diagnosis(const std::string& png_path, const Diagnosis& d, const std::map<std::string, int>& chosen) {
  int L = 0;
  for (const auto& m : d.modules) L = std::max(L, m.layer + 1);
  plot::HeatMap h;
  h.title = fmt::format("Quantization damage per module (1 - CKA), exp(H) = {:.1f}", d.effective_modules);
  h.colorbar_label = "1 - CKA";
  for (int l = 0; l < L; ++l) h.row_labels.push_back(fmt::format("layer {}", l));
  for (const char* k : kKinds) h.col_labels.push_back(k);
  h.values.assign(size_t(L) * 7, std::nan(""));
  h.marked.assign(h.values.size(), 0);
  h.cell_text.assign(h.values.size(), "");
  for (const auto& m : d.modules) {
    const size_t k = size_t(std::find_if(std::begin(kKinds), std::end(kKinds), [&](const char* s) { return m.kind == s; }) - std::begin(kKinds));
    if (k >= 7) continue;
    const size_t idx = size_t(m.layer) * 7 + k;
    h.values[idx] = m.damage;
    auto it = chosen.find(m.module);
    if (it != chosen.end()) {
      h.marked[idx] = 1;
      h.cell_text[idx] = fmt::format("r{}", it->second);
    }
  }
  h.log_scale = true;
  h.marked_label = "compensated (r = rank)";
  plot::write_heatmap(png_path, h);
}

}  // namespace spear
