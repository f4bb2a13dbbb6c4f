#pragma once
// Options and helpers shared by the subcommands.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "backend/backend.h"

namespace spear {
class Model;
}

namespace spear::cli {

struct CommonOptions {
  std::string model_dir;
  bool json = false;
  int threads = 0;
  std::string device = "cpu";
  std::string ec_path = "auto";  // --ec-path (CUDA): auto | naive | fused | overlapped
  std::string ec_dispatch;       // --ec-dispatch FILE (CUDA); empty: <model>/ec_dispatch.json when present
  bool verbose = false;
  // Tensor parallelism (cli/tensor_parallel.cpp)
  int tp = 1;
  int tp_rank = -1;
  std::string tp_master;
  double tp_timeout = 300;
  std::string tp_reduce = "auto";
};

void add_model_option(CLI::App* app, CommonOptions& o);
void add_json_option(CLI::App* app, CommonOptions& o);
void add_runtime_options(CLI::App* app, CommonOptions& o);  // --threads, --device, --ec-path, --ec-dispatch, -v
// The backend of the command; with --tp N > 1 also this process's rank of the tensor-parallel group (started
// first, so that Model::load loads a shard).
std::unique_ptr<Backend> make_backend(const CommonOptions& o);
// --tp, --tp-rank, --tp-master, --tp-timeout (commands that run a model: generate, ppl, bench, serve).
void add_tp_options(CLI::App* app, CommonOptions& o);
std::shared_ptr<ProcessGroup> start_tensor_parallel(const CommonOptions& o);  // null without --tp
int tp_rank_of(const CommonOptions& o);   // this process's rank (0 without tensor parallelism)
void finish_tensor_parallel();            // waits for the ranks this process started
extern std::vector<std::string> g_argv;   // main's arguments, to start local ranks with
std::string read_text_file(const std::string& path);

// One row of `spear bench decode` (cmd_bench.cpp).
struct DecodeRow {
  std::string model, ec_path = "-", tp_reduce = "none";
  int batch = 0, prompt = 0, steps = 0, ec_modules = 0, tp = 1;
  double ec_density = 0, ec_bytes_pct = 0;
  double weight_gb = 0, prefill_ms = 0, step_ms_median = 0, step_ms_p10 = 0, step_ms_p90 = 0;
};
// B sequences of `prompt` random tokens prefilled together, then `steps` timed greedy decode steps after `warmup`
// untimed ones (on CUDA each step a replayed graph); prefill_reps > 1: the median of that many prefills.
DecodeRow bench_decode(Model& m, const std::string& name, int B, int prompt, int steps, int warmup, uint64_t seed,
                       int prefill_reps);

void register_ppl(CLI::App& app);
void register_generate(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_inspect(CLI::App& app);
void register_quantize(CLI::App& app);
void register_diagnose(CLI::App& app);
void register_calibrate(CLI::App& app);
void register_eval(CLI::App& app);
void register_make_model(CLI::App& app);
void register_bench(CLI::App& app);
void register_serve(CLI::App& app);
void register_bench_serve(CLI::App* bench);  // `spear bench serve` (cmd_bench_serve.cpp)
void register_tune(CLI::App& app);
// 1, 2, 4, 8, 9, 16, 17, ... max_tokens: each power of two from 8 on and the count after it (cmd_tune.cpp).
std::vector<int> default_latency_points(int max_tokens);

}  // namespace spear::cli
