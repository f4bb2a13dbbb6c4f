// spear eval: the full-precision model, its quantized base(s) and SPEAR packages on the same text in one
// table: perplexity, gap closed, compensator bytes, per-token KL against full precision.
#include <cstdio>
#include <filesystem>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "eval/compare.h"
#include "model/model.h"
#include "plot/plot.h"
#include "quant/package.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

namespace fs = std::filesystem;

void register_eval(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto packages = std::make_shared<std::vector<std::string>>();
  auto data = std::make_shared<std::string>();
  auto ctx = std::make_shared<int>(512), windows = std::make_shared<int>(0);
  auto plot_kl = std::make_shared<std::string>(), plot_budget = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Compare the full-precision model with quantized packages on a text: perplexity (non-overlapping "
              "windows, as reference.json), gap closed = (ppl_W4 - ppl) / (ppl_W4 - ppl_FP), compensator bytes, "
              "and per-token KL against the full-precision model (mean, p10, p50, p90)");
  add_model_option(cmd, *o);
  cmd->add_option("--packages,-p", *packages, "SPEAR packages (their plain quantized base is added as the W4 row)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--data", *data, "Text file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--ctx", *ctx, "Window length in tokens")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--windows", *windows, "Evaluate only the first N windows (0 = all)")->check(CLI::Range(0, 1 << 30));
  cmd->add_option("--plot-kl", *plot_kl, "Histogram of per-token KL against full precision (PNG)");
  cmd->add_option("--plot-budget", *plot_budget, "Gap closed vs compensator budget, one curve per method (PNG)");
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto be = make_backend(*o);
    Tokenizer tok = Tokenizer::from_dir(o->model_dir);
    std::vector<int32_t> tokens = tok.encode(read_text_file(*data), false);
    struct Row {
      std::string name, kind;  // kind: fp | base | package
      std::unique_ptr<Model> model;
      int base = -1;           // row of this package's quantized base
      size_t ec_bytes = 0, model_bytes = 0;
      nlohmann::json spear;
    };
    std::vector<Row> rows;
    rows.push_back({"full precision", "fp", Model::load(o->model_dir, *be), -1, 0, 0, nullptr});
    std::map<std::string, int> base_of_hash;  // quantized weights file hash -> row
    for (const auto& p : *packages) {
      if (!is_package(p)) throw CLI::ValidationError("--packages", p + " is not a SPEAR package");
      const std::string st = (fs::path(p) / "model.safetensors").string();
      const std::string bytes = [&] {
        std::ifstream in(st, std::ios::binary);
        return std::string(std::istreambuf_iterator<char>(in), {});
      }();
      const std::string h = fmt::format("{:016x}", fnv1a64(bytes.data(), bytes.size()));
      PackageManifest m = read_manifest(p);
      if (!base_of_hash.count(h)) {
        Row b{fmt::format("W{} {}{}", m.params.bits, m.method, m.params.group_size > 0 ? fmt::format(" g{}", m.params.group_size) : ""),
              "base", Model::load(p, *be, LoadOptions{false}), -1, 0, bytes.size(), nullptr};
        base_of_hash[h] = int(rows.size());
        rows.push_back(std::move(b));
      }
      const int base = base_of_hash[h];
      if (m.compensators.empty()) continue;  // a plain package is its own base row
      Row r{fs::path(p).lexically_normal().filename().string(), "package", Model::load(p, *be), base,
            m.compensator_bytes, bytes.size(), m.extra.contains("spear") ? m.extra["spear"] : nlohmann::json(nullptr)};
      if (r.name.empty()) r.name = fs::path(p).parent_path().filename().string();
      rows.push_back(std::move(r));
    }
    std::vector<Model*> ms;
    for (auto& r : rows) ms.push_back(r.model.get());
    long scored = 0;
    std::vector<ModelScore> sc = compare_models(ms, tokens, *ctx, *windows, &scored);

    nlohmann::json jrows = nlohmann::json::array();
    std::string table = fmt::format("{} ({} tokens scored, windows of {})\n{:<28} {:>10} {:>8} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
                                    *data, scored, *ctx, "model", "ppl", "gap %", "EC bytes", "EC %", "KL mean", "p10", "p50", "p90");
    plot::Histogram hist;
    hist.title = "Per-token KL against full precision";
    hist.xlabel = "KL(p_fp || p_model), nats (log scale)";
    hist.log_x = true;
    std::map<std::string, plot::Series> budget_series;
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      double gap = std::nan("");
      if (r.kind == "package") {
        const double w4 = sc[size_t(r.base)].ppl, fp = sc[0].ppl;
        gap = 100.0 * (w4 - sc[i].ppl) / (w4 - fp);
      } else if (r.kind == "base") {
        gap = 0;
      }
      KlSummary k = summarize_kl(sc[i].kl);
      // The quantized model's bytes as the budget counts them (tensor bytes, without the file header).
      double ec_frac = 0;
      if (r.kind == "package" && r.spear.is_object() && r.spear.contains("quantized_model_bytes"))
        ec_frac = double(r.ec_bytes) / r.spear["quantized_model_bytes"].get<double>();
      else if (r.model_bytes)
        ec_frac = double(r.ec_bytes) / double(r.model_bytes);
      table += fmt::format("{:<28} {:>10.4f} {:>8} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8}\n", r.name.substr(0, 28), sc[i].ppl,
                           std::isnan(gap) ? "-" : fmt::format("{:.1f}", gap), r.kind == "package" ? std::to_string(r.ec_bytes) : "-",
                           r.kind == "package" ? fmt::format("{:.3f}", 100 * ec_frac) : "-",
                           i == 0 ? "-" : fmt::format("{:.4f}", k.mean), i == 0 ? "-" : fmt::format("{:.4f}", k.p10),
                           i == 0 ? "-" : fmt::format("{:.4f}", k.p50), i == 0 ? "-" : fmt::format("{:.4f}", k.p90));
      nlohmann::json j = {{"name", r.name}, {"kind", r.kind}, {"ppl", sc[i].ppl}, {"mean_nll", sc[i].mean_nll}};
      if (!std::isnan(gap)) j["gap_closed_pct"] = gap;
      if (r.kind == "package") {
        j["ec_bytes"] = r.ec_bytes;
        j["ec_fraction"] = ec_frac;
        j["base"] = rows[size_t(r.base)].name;
        j["spear"] = r.spear;
      }
      if (i > 0) j["kl"] = {{"mean", k.mean}, {"p10", k.p10}, {"p50", k.p50}, {"p90", k.p90}, {"p99", k.p99}};
      jrows.push_back(j);
      if (i > 0) {
        plot::Series s;
        s.name = r.name;
        for (float v : sc[i].kl) s.y.push_back(std::max(double(v), 1e-6));
        hist.series.push_back(std::move(s));
      }
      if (r.kind == "package" && !std::isnan(gap)) {
        std::string label = r.spear.is_object() ? fmt::format("{} {} {}", r.spear.value("placement", "?"),
                                                              r.spear.value("compensator", "?"),
                                                              r.spear.value("train_steps", 0) > 0 ? "trained" : "closed form")
                                                : "package";
        auto& s = budget_series[label];
        s.name = label;
        s.x.push_back(100 * ec_frac);
        s.y.push_back(gap);
      }
    }
    if (!plot_kl->empty()) plot::write_histogram(*plot_kl, hist);
    if (!plot_budget->empty()) {
      plot::LinePlot lp;
      lp.title = "Gap closed vs compensator budget";
      lp.xlabel = "compensator bytes, % of the quantized model";
      lp.ylabel = "gap closed, %";
      lp.log_x = true;
      lp.hlines = {35.0, 50.0};
      for (auto& [k, s] : budget_series) {
        std::vector<size_t> idx(s.x.size());
        for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
        std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return s.x[a] < s.x[b]; });
        plot::Series t{s.name, {}, {}};
        for (size_t i : idx) t.x.push_back(s.x[i]), t.y.push_back(s.y[i]);
        lp.series.push_back(std::move(t));
      }
      plot::write_line_plot(*plot_budget, lp);
    }
    if (o->json) {
      nlohmann::json j = {{"data", *data}, {"ctx", *ctx}, {"tokens_scored", scored}, {"rows", jrows}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s", table.c_str());
    }
  });
}

}  // namespace spear::cli
