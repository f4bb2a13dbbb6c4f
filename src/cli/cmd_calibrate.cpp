// spear diagnose / spear calibrate: the CKA-guided diagnostic, and the whole SPEAR pipeline to a package
// with error compensators.
#include <cstdio>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "cli/common.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/calibration.h"
#include "spear/calibrate.h"
#include "spear/diagnose.h"

namespace spear::cli {

namespace {

void add_quant_options(CLI::App* cmd, QuantizeOptions& q) {
  cmd->add_option("--method", q.method, "Quantizer of the base model: rtn | gptq")->check(CLI::IsMember({"rtn", "gptq"}));
  cmd->add_option("--bits", q.params.bits, "Bits per weight")->check(CLI::Range(2, 8));
  cmd->add_option("--group", q.params.group_size, "Group size; -1 = per output channel (default)");
  cmd->add_option("--calib", q.calib_file, "Calibration text file (default: sequences sampled from the model)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--seed", q.seed, "Seed for calibration sampling, placement and training (same seed, same bytes)");
}

}  // namespace

void register_diagnose(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto q = std::make_shared<QuantizeOptions>();
  auto plot = std::make_shared<std::string>();
  auto samples = std::make_shared<int>(16), len = std::make_shared<int>(256);
  auto po = std::make_shared<PlacementOptions>();
  po->rule = "spear";
  CLI::App* cmd = app.add_subcommand(
      "diagnose", "Measure how much quantizing each linear module alone damages the model (1 - linear CKA of the "
                  "final hidden states, relative MSE, KL of the next-token distribution), the entropy of that damage "
                  "and each module's compensator cost; print a layer x module table and the placement it implies");
  add_model_option(cmd, *o);
  add_quant_options(cmd, *q);
  cmd->add_option("--samples", *samples, "Calibration sequences used")->check(CLI::Range(1, 4096));
  cmd->add_option("--len", *len, "Tokens per sequence")->check(CLI::Range(2, 1 << 16));
  cmd->add_option("--budget", po->budget, "Compensator bytes as a fraction of the quantized model (for the placement shown)")
      ->check(CLI::Range(1e-6, 1.0));
  cmd->add_option("--placement", po->rule, "Placement rule shown: spear | uniform | random | top-damage")
      ->check(CLI::IsMember({"spear", "uniform", "random", "top-damage"}));
  cmd->add_option("--plot", *plot, "Write the damage heat map (PNG), chosen placement outlined");
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto backend = make_backend(*o);
    CpuBackend be;
    auto model = Model::load(o->model_dir, be);
    CalibrationSet calib = make_calibration_set(*model, o->model_dir, q->calib_file, *samples, *len, q->seed);
    QuantizedWeights qw = quantize_weights(o->model_dir, *q, &calib);
    Diagnosis d = diagnose(*model, o->model_dir, qw.modules, calib.sequences);
    // The placement these figures imply, at the quantized model's size.
    size_t model_bytes = 0;
    {
      Checkpoint ck(o->model_dir);
      model_bytes = ck.total_bytes();
      for (const auto& [name, p] : qw.modules)
        model_bytes = model_bytes - ck.get(name + ".weight").nbytes + p.qweight.size() + p.scales.size() * 4 + p.zeros.size();
    }
    po->model_bytes = model_bytes;
    Placement pl = place_compensators(d, *po);
    if (!plot->empty()) {
      std::map<std::string, int> chosen;
      for (const auto& m : pl.modules) chosen[m.module] = m.rank;
      plot_diagnosis(*plot, d, chosen);
    }
    if (o->json) {
      nlohmann::json j = d.to_json();
      j["placement"] = pl.to_json();
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s\n%s", format_diagnosis(d).c_str(), format_placement(pl).c_str());
      if (!plot->empty()) std::printf("heat map: %s\n", plot->c_str());
    }
  });
}

void register_calibrate(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto c = std::make_shared<CalibrateOptions>();
  c->quant.calib_samples = 256;  // defaults chosen on valid.txt (README: how the defaults were chosen)
  c->train.steps = 200;
  c->train.batch_seqs = 4;
  c->train.lr = 1e-3f;
  auto out = std::make_shared<std::string>();
  auto preset = std::make_shared<std::string>("default");
  auto plot = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Quantize a checkpoint and attach SPEAR error compensators: calibration data, quantization, "
                   "diagnostic, placement under --budget, closed-form initialisation, end-to-end KL training; "
                   "writes a package and calibration_report.json");
  add_model_option(cmd, *o);
  cmd->add_option("--out,-o", *out, "Output package directory")->required();
  add_quant_options(cmd, c->quant);
  cmd->add_option("--preset", *preset, "default: the settings chosen on valid.txt; fast: a smaller run for demos "
                                       "(fewer calibration sequences and steps)")
      ->check(CLI::IsMember({"default", "fast"}));
  cmd->add_option("--budget", c->placement.budget, "Compensator bytes as a fraction of the quantized model's bytes")
      ->check(CLI::Range(1e-6, 1.0));
  cmd->add_option("--placement", c->placement.rule, "uniform (every module, equal rank: the default, best on valid.txt) | "
                                                    "spear (damage per cost, exp(H) modules) | random | top-damage")
      ->check(CLI::IsMember({"spear", "uniform", "random", "top-damage"}));
  cmd->add_option("--compensator", c->compensator, "gated (token-gated) | static (no gate)")
      ->check(CLI::IsMember({"gated", "static"}));
  cmd->add_option("--init", c->init, "Closed-form initialisation: regression | qera | lqer | svd")
      ->check(CLI::IsMember({"regression", "qera", "lqer", "svd"}));
  cmd->add_option("--gate-width", c->placement.gate_width, "Hidden width h of the gate MLP")->check(CLI::Range(1, 1024));
  cmd->add_option("--modules", c->placement.modules, "Number of compensated modules (0: exp(H) from the diagnostic)")
      ->check(CLI::Range(0, 100000));
  cmd->add_option("--calib-samples", c->quant.calib_samples, "Calibration sequences")->check(CLI::Range(1, 100000));
  cmd->add_option("--calib-len", c->quant.calib_len, "Tokens per calibration sequence")->check(CLI::Range(2, 1 << 16));
  cmd->add_option("--steps", c->train.steps, "End-to-end training steps (0: closed form only)")->check(CLI::Range(0, 1000000));
  cmd->add_option("--batch", c->train.batch_seqs, "Sequences per training step")->check(CLI::Range(1, 4096));
  cmd->add_option("--lr", c->train.lr, "Adam learning rate of A and B")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--lr-gate", c->train.lr_gate, "Adam learning rate of the gate (-1: same as --lr)");
  cmd->add_option("--diagnosis", c->diagnosis_in, "Reuse the diagnosis of an earlier calibration_report.json")
      ->check(CLI::ExistingFile);
  cmd->add_option("--calib-ids", c->calib_ids_in, "Read the calibration sequences (token ids) from a file written by "
                                                  "--save-calib-ids, e.g. to share one sampled set between runs")
      ->check(CLI::ExistingFile);
  cmd->add_option("--save-calib-ids", c->calib_ids_out, "Write the calibration sequences used (JSON token ids)");
  cmd->add_flag("!--no-loss-eval", c->train.full_eval, "Report the first and last training batch's KL instead of the "
                                                       "mean over all calibration sequences (saves two passes)");
  cmd->add_option("--plot", *plot, "Also write the damage heat map with the placement (PNG)");
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto backend = make_backend(*o);
    CalibrateOptions opt = *c;
    if (*preset == "fast") {
      // Demo preset: a quarter of the data (64 sequences of 256 tokens) and 60 steps; README has its quality.
      if (cmd->count("--calib-samples") == 0) opt.quant.calib_samples = 64;
      if (cmd->count("--steps") == 0) opt.train.steps = 60;
      if (cmd->count("--calib-len") == 0) opt.quant.calib_len = 256;
      opt.stage1_samples = 16;
      opt.diag_samples = 8;
    }
    opt.train.seed = opt.quant.seed;
    opt.placement.seed = opt.quant.seed;
    CalibrateResult r = calibrate(o->model_dir, *out, opt);
    if (!plot->empty()) {
      Diagnosis d;
      for (const auto& m : r.report["diagnosis"]["modules"]) {
        ModuleDamage md;
        md.module = m["module"];
        md.layer = m["layer"];
        md.kind = m["kind"];
        md.damage = m["damage"];
        d.modules.push_back(md);
      }
      d.effective_modules = r.report["diagnosis"]["effective_modules"];
      std::map<std::string, int> chosen;
      for (const auto& e : r.manifest.compensators) chosen[e.module] = e.rank;
      plot_diagnosis(*plot, d, chosen);
    }
    const auto& rep = r.report;
    if (o->json) {
      std::printf("%s\n", rep.dump().c_str());
      return;
    }
    std::printf("%s", fmt::format("package {}: {} compensators, {} bytes = {:.3f}% of the quantized model ({} bytes)\n",
                                  *out, r.manifest.compensators.size(), r.manifest.compensator_bytes,
                                  100.0 * rep["compensator_fraction"].get<double>(), rep["quantized_model_bytes"].get<size_t>())
                          .c_str());
    for (const auto& [k, v] : rep["seconds"].items()) std::printf("  %-22s %8.1f s\n", k.c_str(), v.get<double>());
    if (!rep["stage2"].is_null())
      std::printf("  end-to-end KL: %.5f -> %.5f (%.0f tokens/s)\n", rep["stage2"]["initial_loss"].get<double>(),
                  rep["stage2"]["final_loss"].get<double>(), rep["stage2"]["tokens_per_second"].get<double>());
    std::printf("  peak memory: %.0f MB; report: %s/calibration_report.json\n", rep["peak_rss_bytes"].get<double>() / 1e6,
                out->c_str());
  });
}

}  // namespace spear::cli
