// spear tune: measures the served model's iteration time by the number of tokens in the batch (the latency
// table the SLO-constrained scheduler of `spear serve --slo-itl-ms` predicts with) and writes it as JSON.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "runtime/latency_table.h"

namespace spear::cli {

std::vector<int> default_latency_points(int max_tokens) {
  std::vector<int> pts;
  for (int n = 1; n < max_tokens; n *= 2) pts.push_back(n);
  pts.push_back(max_tokens);
  return pts;
}

void register_tune(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto out = std::make_shared<std::string>("latency_table.json");
  auto points = std::make_shared<std::vector<int>>();
  auto max_tokens = std::make_shared<int>(512);
  auto reps = std::make_shared<int>(5);
  CLI::App* cmd = app.add_subcommand(
      "tune", "Measure the model's forward time by tokens per iteration (with its error compensators) and write the "
              "latency table that `spear serve --slo-itl-ms` schedules with");
  add_model_option(cmd, *o);
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->add_option("--out", *out, "Latency table file (JSON)")->capture_default_str();
  cmd->add_option("--tokens", *points, "Token counts to measure (default: 1, 2, 4, ... up to --max-tokens)")
      ->delimiter(',');
  cmd->add_option("--max-tokens", *max_tokens, "Largest token count of the default points")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  cmd->add_option("--reps", *reps, "Timed passes per point (median)")->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->callback([=] {
    auto backend = make_backend(*o);
    auto model = Model::load(o->model_dir, *backend);
    LatencyTable t = LatencyTable::measure(*model, points->empty() ? default_latency_points(*max_tokens) : *points,
                                           *reps);
    t.device = o->device;
    t.model = o->model_dir;
    t.save(*out);
    if (o->json) {
      std::printf("%s\n", nlohmann::json{{"out", *out}, {"tokens", t.tokens}, {"ms", t.ms}}.dump().c_str());
      return;
    }
    std::printf("%8s %10s %12s\n", "tokens", "ms", "us/token");
    for (size_t i = 0; i < t.tokens.size(); ++i)
      std::printf("%8d %10.3f %12.1f\n", t.tokens[i], t.ms[i], 1e3 * t.ms[i] / t.tokens[i]);
    std::printf("wrote %s\n", out->c_str());
  });
}

}  // namespace spear::cli
