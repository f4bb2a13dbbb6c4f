// spear bench decode: end-to-end greedy decode speed (ms per step) of one or more models at several batch sizes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "core/error.h"
#include "model/model.h"
#include "spear/random_ec.h"

namespace spear::cli {

namespace {

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

// B sequences of `prompt` random tokens prefilled together (prefill_reps times into the same cache, as a server
// reuses its cache, after two untimed prefills when prefill_reps > 1, the eager first run and the graph capture of
// a GPU backend: median), then `steps` greedy decode steps (one token per sequence
// each); the first `warmup` steps (eager run, graph capture) are not timed. Every step ends with the new token
// ids on the host, as a serving loop needs them.
DecodeRow bench_decode(Model& m, const std::string& name, int B, int prompt, int steps, int warmup, uint64_t seed,
                       int prefill_reps) {
  const int V = m.config().vocab_size;
  std::mt19937 rng(uint32_t(seed + uint64_t(B)));
  std::uniform_int_distribution<int> tok(0, V - 1);
  Batch pre;
  for (int b = 0; b < B; ++b) {
    pre.seqs.push_back({int(pre.tokens.size()), prompt, 0, b});
    for (int i = 0; i < prompt; ++i) pre.tokens.push_back(tok(rng));
  }
  std::unique_ptr<KvCache> cache = m.make_kv_cache(B, prompt + steps + warmup + 1);
  std::vector<int32_t> next;
  std::vector<double> pre_ms;
  for (int rep = prefill_reps > 1 ? -2 : 0; rep < prefill_reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    next = m.forward_greedy(pre, *cache);
    if (rep >= 0) pre_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  DecodeRow r;
  r.prefill_ms = percentile(pre_ms, 0.5);
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

void register_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (kernel benchmarks are the bench_* programs of bench/)");
  bench->require_subcommand(1);
  register_bench_serve(bench);
  auto o = std::make_shared<CommonOptions>();
  auto models = std::make_shared<std::vector<std::string>>();
  auto batches = std::make_shared<std::vector<int>>(std::vector<int>{1, 8, 32});
  auto prompt = std::make_shared<int>(128), steps = std::make_shared<int>(64), warmup = std::make_shared<int>(3);
  auto out = std::make_shared<std::string>();
  auto densities = std::make_shared<std::vector<double>>(std::vector<double>{0.0});
  auto ec_paths = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"auto"});
  auto ec_kinds = std::make_shared<std::vector<std::string>>();
  auto ec_rank = std::make_shared<int>(16), ec_gate = std::make_shared<int>(8), prefill_reps = std::make_shared<int>(1);
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
  cmd->add_option("--prefill-reps", *prefill_reps,
                  "Timed prefills per row (median; >1 adds two untimed first: eager, graph capture)")
      ->check(CLI::Range(1, 100));
  cmd->add_option("--ec-density", *densities,
                  "Attach random-weight error compensators to this fraction of the decoder linears (list: one row "
                  "set per density; 0 = the model as loaded)")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--ec-modules", *ec_kinds,
                  "Only these kinds of linears get random compensators (e.g. o_proj,down_proj: the row-parallel ones "
                  "under --tp); --ec-density is then a fraction of them. Default: every decoder linear")
      ->delimiter(',');
  cmd->add_option("--ec-rank", *ec_rank, "Rank of the random compensators")->check(CLI::Range(1, 1024))->capture_default_str();
  cmd->add_option("--ec-gate", *ec_gate, "Gate width of the random compensators (0: static)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  cmd->add_option("--ec-paths", *ec_paths, "EC paths to measure, each a row set: auto, naive, fused, overlapped")
      ->delimiter(',')
      ->check(CLI::IsMember({"auto", "naive", "fused", "overlapped"}));
  add_runtime_options(cmd, *o);
  add_tp_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto backend = make_backend(*o);
    std::vector<DecodeRow> rows;
    for (const std::string& dir : *models) {
      auto m = Model::load(dir, *backend);
      bool attached = false;
      for (double density : *densities) {
        size_t ec_bytes = 0;
        int n_ec = 0;
        if (density > 0 || attached) detach_compensators(*m), attached = false;
        if (density > 0) {
          for (const Compensator& c : attach_random_compensators(*m, density, *ec_rank, *ec_gate, 1234, *ec_kinds))
            ec_bytes += c.bytes(), ++n_ec;
          attached = true;
        }
        // Without ECs, or on a backend with one EC path (CPU), the path does not matter: one row set.
        const bool has_ec = density > 0 || !m->compensated_modules().empty();
        const std::vector<std::string> paths =
            has_ec && backend->device() == Device::CUDA ? *ec_paths : std::vector<std::string>{"auto"};
        for (const std::string& path : paths) {
          backend->set_ec_path(parse_ec_path(path));
          for (int B : *batches) {
            if (B < 1) fail("--batch: batch sizes must be >= 1 (got {})", B);
            rows.push_back(bench_decode(*m, dir, B, *prompt, *steps, *warmup, 0, *prefill_reps));
            DecodeRow& r = rows.back();
            r.ec_density = density;
            r.ec_modules = n_ec;
            r.ec_bytes_pct = 100.0 * double(ec_bytes) / double(std::max<size_t>(m->weight_bytes() - ec_bytes, 1));
            if (has_ec) r.ec_path = backend->device() == Device::CUDA ? path : "cpu";
            r.tp = m->shard().size;
            r.tp_reduce = backend->tp_reduce_description();
            if (!o->json && m->shard().rank == 0)
              std::fprintf(stderr, "%s ec %.2f %s batch %d: %.3f ms/step\n", dir.c_str(), density, r.ec_path.c_str(),
                           B, r.step_ms_median);
          }
        }
        backend->set_ec_path(parse_ec_path(o->ec_path));
      }
    }
    nlohmann::json j = nlohmann::json::array();
    for (const auto& r : rows)
      j.push_back({{"model", r.model}, {"batch", r.batch}, {"prompt", r.prompt}, {"steps", r.steps},
                   {"weight_gb", r.weight_gb}, {"prefill_ms", r.prefill_ms}, {"step_ms_median", r.step_ms_median},
                   {"step_ms_p10", r.step_ms_p10}, {"step_ms_p90", r.step_ms_p90},
                   {"tokens_per_s", 1000.0 * r.batch / r.step_ms_median}, {"ec_density", r.ec_density},
                   {"ec_modules", r.ec_modules}, {"ec_bytes_pct", r.ec_bytes_pct}, {"ec_path", r.ec_path},
                   {"prefill_tokens_per_s", 1000.0 * r.batch * r.prompt / r.prefill_ms}, {"tp", r.tp},
                   {"tp_reduce", r.tp_reduce}});
    nlohmann::json doc = {{"device", o->device}, {"backend", backend->name()}, {"rows", j}};
    if (!out->empty() && tp_rank_of(*o) == 0) {  // every rank measures; rank 0 reports
      std::FILE* f = std::fopen(out->c_str(), "w");
      if (!f) fail("cannot write {}", *out);
      std::fprintf(f, "%s\n", doc.dump(2).c_str());
      std::fclose(f);
    }
    if (o->json) {
      std::printf("%s\n", doc.dump().c_str());
      return;
    }
    std::printf("%-32s %3s %9s %5s %6s %-10s %6s %11s %10s %13s %9s %9s %10s\n", "model", "tp", "weights", "EC %",
                "EC B%", "EC path", "batch", "prefill ms", "prefill/s", "ms/step (p50)", "p10", "p90", "tokens/s");
    for (const auto& r : rows)
      std::printf("%-32s %3d %7.2f GB %5.0f %6.2f %-10s %6d %11.1f %10.0f %13.3f %9.3f %9.3f %10.0f\n",
                  r.model.c_str(), r.tp, r.weight_gb, 100 * r.ec_density, r.ec_bytes_pct, r.ec_path.c_str(), r.batch, r.prefill_ms,
                  1000.0 * r.batch * r.prompt / r.prefill_ms, r.step_ms_median, r.step_ms_p10, r.step_ms_p90,
                  1000.0 * r.batch / r.step_ms_median);
  });
}

}  // namespace spear::cli
