// spear tune: measures the served model's iteration time by the number of tokens in the batch (the latency
// table the SLO-constrained scheduler of `spear serve --slo-itl-ms` predicts with) and writes it as JSON; on
// --device cuda with compensators also the EC dispatch table (every EC path timed per module shape and token
// count, backend/ec_dispatch.h, then checked on whole decode steps where it picks a second stream); the latency
// table is then measured with that dispatch table.
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <tuple>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "core/error.h"
#include "runtime/latency_table.h"
#include "spear/random_ec.h"

namespace spear::cli {

// The GPU kernels change tiers right after powers of two (the W4 GEMM's token tiles: 8, 16, 32, 64, 128 tokens,
// then 128-token chunks or the dequantize + cuBLAS path), so the time steps up between p and p + 1 and stays
// flat to 2p. Points on both sides of each step keep the piecewise-linear table from interpolating across it
// (with 1, 2, 4, ... alone, 65 tokens was predicted near 64 while it costs what 128 does).
std::vector<int> default_latency_points(int max_tokens) {
  std::vector<int> pts;
  for (int n = 1; n < max_tokens; n *= 2) {
    pts.push_back(n);
    if (n >= 8 && n + 1 < max_tokens) pts.push_back(n + 1);
  }
  pts.push_back(max_tokens);
  return pts;
}

namespace {

// The step check: timing one linear alone misses what a second stream costs the rest of a decode step (more
// launches, the joins), so wherever the table picks overlapped over a fused path it also timed (the fused kernel's
// token counts only, up to 32), whole decode steps of that many sequences are timed with the table as it is and
// with fused in those entries, and the faster table is kept. (H200, 1B at 32 tokens: down_proj overlapped 35.6 vs fused
// 36.5 µs alone, yet the whole step with it fused was 2-3% faster.) Overlapped must win by kStepMargin: fused is the
// decode default, and a near-tie here has gone either way in the benchmark's own process (1B, 8 sequences, 15% ECs:
// 1.144 vs 1.146 ms here, then 1.227 vs 1.178 ms in spear bench decode).
constexpr double kStepMargin = 0.01;
void check_steps(Model& model, EcDispatchTable& table, const std::vector<int>& tokens, const CommonOptions& o) {
  constexpr int kPrompt = 128, kSteps = 24, kWarmup = 3;
  for (int m : tokens) {
    EcDispatchTable fused = table;
    int flips = 0;
    for (EcDispatchTable::Entry& e : fused.entries)
      if (e.m == m && e.path == EcPath::Overlapped && e.us.count(EcPath::Fused)) e.path = EcPath::Fused, ++flips;
    if (!flips) continue;
    auto step_ms = [&](const EcDispatchTable& t) {
      model.backend().set_ec_dispatch(std::make_shared<const EcDispatchTable>(t));
      return bench_decode(model, "", m, kPrompt, kSteps, kWarmup, 7, 1).step_ms_median;
    };
    // Twice each, interleaved, so that drift between the two does not decide it.
    const double t1 = step_ms(table), f1 = step_ms(fused), t2 = step_ms(table), f2 = step_ms(fused);
    const double t_ms = std::min(t1, t2), f_ms = std::min(f1, f2);
    const bool keep_fused = f_ms <= t_ms * (1 + kStepMargin);
    if (!o.json)
      std::printf("step check, %d sequences: overlapped in %d entr%s %.3f ms, fused there %.3f ms: %s\n", m, flips,
                  flips == 1 ? "y" : "ies", t_ms, f_ms, keep_fused ? "fused" : "overlapped");
    if (keep_fused) table = std::move(fused);
  }
  // What follows (the latency table) runs with the table being written.
  model.backend().set_ec_dispatch(std::make_shared<const EcDispatchTable>(table));
}

// Times every EC path of each distinct compensated module shape and writes the dispatch table.
void tune_ec_dispatch(Model& model, const std::vector<std::string>& modules, const std::vector<int>& tokens, int reps,
                      const CommonOptions& o, const std::string& out) {
  std::map<std::tuple<int, int, int, int>, std::vector<const Linear*>> shapes;  // (n, k, rank, gate) -> modules
  for (const std::string& name : modules) {
    const Linear* l = model.linear_slot(name).get();
    const auto [rank, gate] = model.backend().compensator_shape(*l);
    if (rank > 0) shapes[std::make_tuple(l->out_features, l->in_features, rank, gate)].push_back(l);
  }
  EcDispatchTable table;
  table.device = o.device;
  table.model = o.model_dir;
  if (!o.json)
    std::printf("%-44s %6s %6s %5s %5s %6s %9s %10s %10s %10s  %s\n", "module (first of its shape)", "n", "k", "rank",
                "gate", "tokens", "no EC us", "naive us", "overlap us", "fused us", "choice");
  for (const auto& [key, ls] : shapes) {
    const auto [n, k, rank, gate] = key;
    const Linear* l = ls.front();
    for (const Backend::EcTiming& t : model.backend().time_ec_paths(ls, tokens, reps)) {
      table.add(n, k, rank, gate, t.m, t.us);
      if (o.json) continue;
      auto us = [&](EcPath p) {
        auto it = t.us.find(p);
        return it == t.us.end() ? std::string("-") : fmt::format("{:.1f}", it->second);
      };
      std::printf("%-44s %6d %6d %5d %5d %6d %9.1f %10s %10s %10s  %s\n", l->name.c_str(), n, k, rank, gate, t.m,
                  t.base_us, us(EcPath::Naive).c_str(), us(EcPath::Overlapped).c_str(), us(EcPath::Fused).c_str(),
                  ec_path_name(table.entries.back().path));
    }
  }
  check_steps(model, table, tokens, o);
  table.save(out);
  if (!o.json) std::printf("wrote %s (%zu entries)\n", out.c_str(), table.entries.size());
}

}  // namespace

void register_tune(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto out = std::make_shared<std::string>("latency_table.json");
  auto points = std::make_shared<std::vector<int>>();
  auto max_tokens = std::make_shared<int>(512);
  auto reps = std::make_shared<int>(5);
  auto ec_out = std::make_shared<std::string>("ec_dispatch.json");
  auto ec_tokens = std::make_shared<std::vector<int>>(EcDispatchTable::default_tokens());
  auto ec_density = std::make_shared<double>(0.0);
  auto ec_rank = std::make_shared<int>(16), ec_gate = std::make_shared<int>(8), ec_reps = std::make_shared<int>(15);
  auto no_latency = std::make_shared<bool>(false);
  auto max_seqs = std::make_shared<int>(16);
  CLI::App* cmd = app.add_subcommand(
      "tune", "Measure the model's forward time by tokens per iteration (with its error compensators) and write the "
              "latency table that `spear serve --slo-itl-ms` schedules with");
  add_model_option(cmd, *o);
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->add_option("--out", *out, "Latency table file (JSON)")->capture_default_str();
  cmd->add_option("--tokens", *points,
                  "Token counts to measure (default: 1, 2, 4, 8, 9, 16, 17, ... up to --max-tokens: both sides of "
                  "each power of two)")
      ->delimiter(',');
  cmd->add_option("--max-tokens", *max_tokens, "Largest token count of the default points")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  cmd->add_option("--reps", *reps, "Timed passes per point (median)")->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->add_flag("--no-latency-table", *no_latency, "Skip the latency table (only the EC dispatch table)");
  cmd->add_option("--max-seqs", *max_seqs,
                  "Largest batch of decoding sequences timed for the batch-composition terms (as serve's --max-running)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--ec-dispatch-out", *ec_out,
                  "EC dispatch table file (--device cuda, when the model has compensators): load it with "
                  "--ec-dispatch, or name it ec_dispatch.json in the model directory")
      ->capture_default_str();
  cmd->add_option("--ec-tokens", *ec_tokens, "Token counts the EC paths are timed at")->delimiter(',');
  cmd->add_option("--ec-reps", *ec_reps, "Timed replays of the graph of calls per EC path and token count (median)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd->add_option("--ec-density", *ec_density,
                  "Attach random-weight compensators to this fraction of the linears first (models without a "
                  "calibration, as `spear bench decode --ec-density`)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--ec-rank", *ec_rank, "Rank of the random compensators")->check(CLI::Range(1, 1024))->capture_default_str();
  cmd->add_option("--ec-gate", *ec_gate, "Gate width of the random compensators")->check(CLI::Range(0, 1024))->capture_default_str();
  cmd->callback([=] {
    auto backend = make_backend(*o);
    backend->set_prefill_graphs(false);  // the latency table is for spear serve, which runs prefills eagerly
    auto model = Model::load(o->model_dir, *backend);
    std::vector<std::string> ec_modules = model->compensated_modules();
    if (*ec_density > 0) {
      detach_compensators(*model);
      ec_modules.clear();
      for (const Compensator& c : attach_random_compensators(*model, *ec_density, *ec_rank, *ec_gate, 1234))
        ec_modules.push_back(c.module);
    }
    if (o->device == "cuda" && !ec_modules.empty()) tune_ec_dispatch(*model, ec_modules, *ec_tokens, *ec_reps, *o, *ec_out);
    if (*no_latency) return;
    LatencyTable t = LatencyTable::measure(*model, points->empty() ? default_latency_points(*max_tokens) : *points,
                                           *reps);
    t.measure_batches(*model, *reps, *max_seqs, *max_tokens);
    t.device = o->device;
    t.model = o->model_dir;
    t.save(*out);
    if (o->json) {
      std::printf("%s\n", nlohmann::json{{"out", *out}, {"tokens", t.tokens}, {"ms", t.ms}, {"ms_per_kpair", t.ms_per_kpair},
                                          {"ms_per_seq", t.ms_per_seq}}.dump().c_str());
      return;
    }
    std::printf("%8s %10s %12s\n", "tokens", "ms", "us/token");
    for (size_t i = 0; i < t.tokens.size(); ++i)
      std::printf("%8d %10.3f %12.1f\n", t.tokens[i], t.ms[i], 1e3 * t.ms[i] / t.tokens[i]);
    std::printf("batch terms: %.4f ms per 1000 attention pairs over cached context, %.3f ms per extra sequence\n",
                t.ms_per_kpair, t.ms_per_seq);
    std::printf("wrote %s\n", out->c_str());
  });
}

}  // namespace spear::cli
