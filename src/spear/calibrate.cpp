#include "spear/calibrate.h"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/calibration.h"
#include "spear/closed_form_stage.h"
#include "spear/diagnose.h"
#include "spear/train/train_weights.h"

namespace spear {

namespace fs = std::filesystem;
using nlohmann::json;

size_t peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return size_t(std::stoull(line.substr(6))) * 1024;
  return 0;
}

namespace {

using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

// Bytes of the package's tensors: the source checkpoint's, with each quantized weight replaced by its codes,
// scales and zero points.
size_t quantized_model_bytes(const std::string& model_dir, const std::map<std::string, PackedQuantWeights>& q) {
  Checkpoint ck(model_dir);
  size_t n = ck.total_bytes();
  for (const auto& [name, p] : q) {
    n -= ck.get(name + ".weight").nbytes;
    n += p.qweight.size() + p.scales.size() * sizeof(float) + p.zeros.size();
  }
  return n;
}

Diagnosis diagnosis_from_json(const json& j) {
  Diagnosis d;
  const json& jd = j.contains("diagnosis") ? j["diagnosis"] : j;
  try {
    for (const json& m : jd.at("modules")) {
      ModuleDamage md;
      md.module = m.at("module").get<std::string>();
      md.layer = m.at("layer").get<int>();
      md.kind = m.at("kind").get<std::string>();
      md.out = m.at("out").get<int>();
      md.in = m.at("in").get<int>();
      md.cka = m.at("cka").get<double>();
      md.damage = m.at("damage").get<double>();
      md.rel_mse = m.value("rel_mse", 0.0);
      md.kl = m.value("kl", 0.0);
      md.bytes_per_rank = m.at("ec_bytes_per_rank").get<size_t>();
      md.linear_us = m.value("linear_us", 0.0);
      md.ec_us_per_rank = m.value("ec_us_per_rank", 0.0);
      d.modules.push_back(md);
    }
    d.entropy = jd.at("entropy").get<double>();
    d.effective_modules = jd.at("effective_modules").get<double>();
    d.tokens = jd.value("tokens", 0L);
  } catch (const json::exception& e) {
    fail("diagnosis JSON: {}", e.what());
  }
  return d;
}

}  // namespace

CalibrateResult calibrate(const std::string& model_dir, const std::string& out_dir, const CalibrateOptions& o) {
  auto t_all = clk::now();
  if (is_package(model_dir)) fail("{} is already a package; calibrate from the original checkpoint", model_dir);
  if (fs::exists(fs::path(out_dir) / "config.json") && fs::equivalent(model_dir, out_dir))
    fail("output directory {} is the source model directory", out_dir);
  if (o.compensator != "gated" && o.compensator != "static")
    fail("unknown compensator '{}' (gated, static)", o.compensator);
  const EcInit init = parse_ec_init(o.init);
  json report = {{"tool_version", SPEAR_VERSION}, {"model", model_dir}};
  json timings = json::object();

  CpuBackend be;
  auto fp = Model::load(model_dir, be);
  const ModelConfig& cfg = fp->config();

  auto t = clk::now();
  CalibrationSet calib =
      o.calib_ids_in.empty()
          ? make_calibration_set(*fp, model_dir, o.quant.calib_file, o.quant.calib_samples, o.quant.calib_len, o.quant.seed)
          : load_calibration(o.calib_ids_in, cfg.vocab_size);
  if (!o.calib_ids_out.empty()) save_calibration(calib, o.calib_ids_out);
  timings["calibration_data"] = since(t);

  t = clk::now();
  QuantizedWeights qw = quantize_weights(model_dir, o.quant, &calib);
  timings["quantization"] = since(t);
  const size_t model_bytes = quantized_model_bytes(model_dir, qw.modules);

  t = clk::now();
  Diagnosis diag;
  if (!o.diagnosis_in.empty()) {
    std::ifstream in(o.diagnosis_in);
    if (!in) fail("cannot read {}", o.diagnosis_in);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail("{}: invalid JSON: {}", o.diagnosis_in, e.what());
    }
    diag = diagnosis_from_json(j);
  } else {
    std::vector<std::vector<int32_t>> sub;
    for (int i = 0; i < std::min<int>(o.diag_samples, int(calib.sequences.size())); ++i) {
      const auto& s = calib.sequences[size_t(i)];
      sub.emplace_back(s.begin(), s.begin() + std::min<size_t>(s.size(), size_t(o.diag_len)));
    }
    diag = diagnose(*fp, model_dir, qw.modules, sub);
  }
  timings["diagnosis"] = since(t);

  PlacementOptions po = o.placement;
  po.model_bytes = model_bytes;
  if (o.compensator == "static") po.gate_width = 0;
  Placement placement = place_compensators(diag, po);

  // Stage 1 on a second copy of the model with the quantized weights swapped in.
  t = clk::now();
  auto qm = Model::load(model_dir, be);
  {
    Checkpoint ck(model_dir);
    for (const auto& [name, p] : qw.modules) {
      std::vector<float> bias;
      if (ck.has(name + ".bias")) bias = ck.get(name + ".bias").to_f32();
      qm->linear_slot(name) = be.make_quant_linear(name, p, bias);
    }
  }
  std::vector<std::vector<int32_t>> s1(calib.sequences.begin(),
                                       calib.sequences.begin() + std::min<size_t>(calib.sequences.size(), size_t(std::max(1, o.stage1_samples))));
  ClosedFormOptions cfo;
  cfo.init = init;
  cfo.gate_init_std = o.gate_init_std;
  cfo.seed = o.quant.seed;
  cfo.chunk_sequences = o.chunk_sequences;
  json stage1;
  std::vector<Compensator> ecs = fit_closed_form(*fp, *qm, model_dir, qw.modules, placement, s1, cfo, stage1);
  qm.reset();
  timings["stage1_closed_form"] = since(t);

  // Stage 2: the full-precision model's final hidden states are the teacher (its logits are recomputed from
  // them per step, which costs one lm_head GEMM instead of a whole forward).
  json train_json = nullptr;
  if (o.train.steps > 0) {
    t = clk::now();
    const int len = int(calib.sequences[0].size()), H = cfg.hidden_size;
    std::vector<float> teacher(calib.sequences.size() * size_t(len) * H);
    {
      const int cs = std::max(1, o.chunk_sequences);
      auto cache = fp->make_kv_cache(cs, len);
      ProgressBar bar("teacher hidden states", long(calib.sequences.size()));
      for (size_t s0 = 0; s0 < calib.sequences.size(); s0 += size_t(cs)) {
        Batch b;
        for (size_t s = s0; s < std::min(calib.sequences.size(), s0 + size_t(cs)); ++s) {
          b.seqs.push_back({int(b.tokens.size()), len, 0, int(s - s0)});
          b.tokens.insert(b.tokens.end(), calib.sequences[s].begin(), calib.sequences[s].end());
        }
        float* dst = teacher.data() + s0 * size_t(len) * H;
        TapFn tap = [&](const std::string& name, TapPoint pt, const Tensor& x) {
          if (name == "model.norm" && pt == TapPoint::Output) be.download(x, dst);
        };
        fp->forward(b, *cache, LogitsMode::None, &tap);
        bar.update(long(std::min(calib.sequences.size(), s0 + size_t(cs))));
      }
    }
    fp.reset();
    TrainWeights tw = load_train_weights(model_dir, qw.modules);
    std::vector<Compensator*> ptrs;
    for (auto& e : ecs) ptrs.push_back(&e);
    TrainOptions to = o.train;
    ProgressBar bar("stage 2: end-to-end KL training", to.steps);
    auto user_cb = to.on_step;
    to.on_step = [&](int step, double loss) {
      bar.update(step + 1, fmt::format("KL {:.4f}", loss));
      if (user_cb) user_cb(step, loss);
    };
    TrainReport tr = train_compensators(tw, ptrs, calib.sequences, teacher, to);
    bar.finish();
    train_json = {{"steps", to.steps}, {"batch_seqs", to.batch_seqs}, {"lr", to.lr}, {"lr_gate", to.lr_gate},
                  {"warmup", to.warmup}, {"schedule", to.schedule}, {"weight_decay", to.weight_decay},
                  {"grad_clip", to.grad_clip}, {"train_gate", to.train_gate}, {"initial_loss", tr.initial_loss},
                  {"final_loss", tr.final_loss}, {"tokens_per_second", tr.tokens_per_second},
                  {"seconds", tr.seconds}, {"loss_per_step", tr.loss_per_step}};
    timings["stage2_training"] = since(t);
  }
  for (auto& e : ecs) e.round_to_bf16();

  PackageManifest m = qw.manifest;
  m.extra["spear"] = {{"placement", placement.rule}, {"budget", po.budget}, {"compensator", o.compensator},
                      {"init", ec_init_name(init)}, {"train_steps", o.train.steps},
                      {"quantized_model_bytes", model_bytes}};
  write_package(out_dir, model_dir, m, qw.modules, ecs);
  CalibrateResult r;
  r.manifest = read_manifest(out_dir);

  report["calibration"] = {{"source", calib.source}, {"sequences", calib.sequences.size()},
                           {"length", calib.sequences[0].size()}, {"hash", calib.hash()}};
  report["options"] = {{"method", o.quant.method}, {"bits", o.quant.params.bits}, {"group_size", o.quant.params.group_size},
                       {"calib", o.quant.calib_file.empty() ? "model-samples" : o.quant.calib_file},
                       {"calib_samples", o.quant.calib_samples}, {"calib_len", o.quant.calib_len}, {"seed", o.quant.seed},
                       {"budget", po.budget}, {"placement", po.rule}, {"compensator", o.compensator},
                       {"gate_width", po.gate_width}, {"init", ec_init_name(init)}, {"diag_samples", o.diag_samples},
                       {"diag_len", o.diag_len}, {"stage1_samples", o.stage1_samples}};
  report["quantized_model_bytes"] = model_bytes;
  report["compensator_bytes"] = r.manifest.compensator_bytes;
  report["compensator_fraction"] = double(r.manifest.compensator_bytes) / double(model_bytes);
  report["diagnosis"] = diag.to_json();
  report["placement"] = placement.to_json();
  report["stage1"] = stage1;
  report["stage2"] = train_json;
  timings["total"] = since(t_all);
  report["seconds"] = timings;
  report["peak_rss_bytes"] = peak_rss_bytes();
  std::ofstream(fs::path(out_dir) / "calibration_report.json") << report.dump(1) << "\n";
  r.report = report;
  return r;
}

}  // namespace spear
