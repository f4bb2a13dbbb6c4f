// spear bench decode: end-to-end greedy decode speed (ms per step) of one or more models at several batch sizes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "core/error.h"
#include "model/model.h"

namespace spear::cli {

namespace {

struct DecodeRow {
  std::string model;
  int batch = 0, prompt = 0, steps = 0;
  double weight_gb = 0, prefill_ms = 0, step_ms_median = 0, step_ms_p10 = 0, step_ms_p90 = 0;
};

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5));
  return v[i];
}

// B sequences of `prompt` random tokens prefilled together, then `steps` greedy decode steps (one token per
// sequence each); the first `warmup` steps (eager run, graph capture) are not timed. Every step ends with the
// new token ids on the host, as a serving loop needs them.
DecodeRow bench_decode(Model& m, const std::string& name, int B, int prompt, int steps, int warmup, uint64_t seed) {
  const int V = m.config().vocab_size;
  auto cache = m.make_kv_cache(B, prompt + steps + warmup + 1);
  std::mt19937 rng(uint32_t(seed + uint64_t(B)));
  std::uniform_int_distribution<int> tok(0, V - 1);
  Batch pre;
  for (int b = 0; b < B; ++b) {
    pre.seqs.push_back({int(pre.tokens.size()), prompt, 0, b});
    for (int i = 0; i < prompt; ++i) pre.tokens.push_back(tok(rng));
  }
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> next = m.forward_greedy(pre, *cache);
  DecodeRow r;
  r.prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::vector<double> times;
  for (int s = 0; s < warmup + steps; ++s) {
    Batch step;
    for (int b = 0; b < B; ++b) {
      step.seqs.push_back({b, 1, prompt + s, b});
      step.tokens.push_back(next[size_t(b)]);
    }
    auto t1 = std::chrono::steady_clock::now();
    next = m.forward_greedy(step, *cache);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
    if (s >= warmup) times.push_back(ms);
  }
  r.model = name;
  r.batch = B;
  r.prompt = prompt;
  r.steps = steps;
  r.weight_gb = double(m.weight_bytes()) / 1e9;
  r.step_ms_median = percentile(times, 0.5);
  r.step_ms_p10 = percentile(times, 0.1);
  r.step_ms_p90 = percentile(times, 0.9);
  return r;
}

}  // namespace

void register_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (kernel benchmarks are the bench_* programs of bench/)");
  bench->require_subcommand(1);
  register_bench_serve(bench);
  auto o = std::make_shared<CommonOptions>();
  auto models = std::make_shared<std::vector<std::string>>();
  auto batches = std::make_shared<std::vector<int>>(std::vector<int>{1, 8, 32});
  auto prompt = std::make_shared<int>(128), steps = std::make_shared<int>(64), warmup = std::make_shared<int>(3);
  auto out = std::make_shared<std::string>();
  CLI::App* cmd = bench->add_subcommand(
      "decode", "Greedy decode speed: B sequences of --prompt random tokens are prefilled together, then --steps "
                "decode steps are timed (median ms per step = ms per token of each sequence; tokens/s = B / step). "
                "On --device cuda each decode step is one replayed CUDA graph");
  cmd->add_option("--model,-m", *models, "Model directories or packages (several: one table)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--batch,-b", *batches, "Batch sizes (sequences decoded together)")->delimiter(',');
  cmd->add_option("--prompt", *prompt, "Prompt tokens per sequence")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--steps", *steps, "Timed decode steps")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--warmup", *warmup, "Untimed decode steps first")->check(CLI::Range(2, 1000));
  cmd->add_option("--out", *out, "Also write the rows as JSON to this file");
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto backend = make_backend(*o);
    std::vector<DecodeRow> rows;
    for (const std::string& dir : *models) {
      auto m = Model::load(dir, *backend);
      for (int B : *batches) {
        if (B < 1) fail("--batch: batch sizes must be >= 1 (got {})", B);
        rows.push_back(bench_decode(*m, dir, B, *prompt, *steps, *warmup, 0));
        const DecodeRow& r = rows.back();
        if (!o->json)
          std::fprintf(stderr, "%s batch %d: %.3f ms/step\n", dir.c_str(), B, r.step_ms_median);
      }
    }
    nlohmann::json j = nlohmann::json::array();
    for (const auto& r : rows)
      j.push_back({{"model", r.model}, {"batch", r.batch}, {"prompt", r.prompt}, {"steps", r.steps},
                   {"weight_gb", r.weight_gb}, {"prefill_ms", r.prefill_ms}, {"step_ms_median", r.step_ms_median},
                   {"step_ms_p10", r.step_ms_p10}, {"step_ms_p90", r.step_ms_p90},
                   {"tokens_per_s", 1000.0 * r.batch / r.step_ms_median}});
    nlohmann::json doc = {{"device", o->device}, {"backend", backend->name()}, {"rows", j}};
    if (!out->empty()) {
      std::FILE* f = std::fopen(out->c_str(), "w");
      if (!f) fail("cannot write {}", *out);
      std::fprintf(f, "%s\n", doc.dump(2).c_str());
      std::fclose(f);
    }
    if (o->json) {
      std::printf("%s\n", doc.dump().c_str());
      return;
    }
    std::printf("%-40s %9s %6s %11s %13s %9s %9s %10s\n", "model", "weights", "batch", "prefill ms", "ms/step (p50)",
                "p10", "p90", "tokens/s");
    for (const auto& r : rows)
      std::printf("%-40s %7.2f GB %6d %11.1f %13.3f %9.3f %9.3f %10.0f\n", r.model.c_str(), r.weight_gb, r.batch,
                  r.prefill_ms, r.step_ms_median, r.step_ms_p10, r.step_ms_p90, 1000.0 * r.batch / r.step_ms_median);
  });
}

}  // namespace spear::cli
