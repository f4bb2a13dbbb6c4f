// CPU benchmark: fp32 GEMM (our linear op vs OpenBLAS sgemm on the same shapes, same run) and end-to-end
// prefill / decode throughput of a model. Prints tables and writes JSON (default bench/results/).
//
//   build/bench/bench_cpu --model models/ref-llama-23m [--package PKG ...] [--threads N] [--out FILE]
// With --package, the end-to-end part also runs each quantized package (same run), and reports the
// weights' resident size next to the checkpoint's BF16 size.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <cblas.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "backend/cpu/cpu_backend.h"
#include "bench_util.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/sampler.h"

extern "C" char* openblas_get_corename();

using namespace spear;
using clk = std::chrono::steady_clock;

namespace {

using bench::shell;

// Median seconds of `reps` runs of f after one warm-up.
template <typename F>
double time_median(F&& f, int reps) {
  f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = clk::now();
    f();
    t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir = "models/ref-llama-23m", out_path;
  std::vector<std::string> packages;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) model_dir = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--package" && i + 1 < argc) packages.push_back(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_cpu [--model DIR] [--package PKG]... [--threads N] [--out FILE.json]\n");
      return 2;
    }
  }
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
  const int nthreads = omp_get_max_threads();
  nlohmann::json J;
  J["commit"] = shell("git rev-parse --short HEAD 2>/dev/null");
  J["device"] = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
  J["cores"] = nthreads;
  J["openblas_core"] = openblas_get_corename();
  J["date"] = shell("date -u +%Y-%m-%dT%H:%M:%SZ");

  CpuBackend be;
  auto model = Model::load(model_dir, be);
  const ModelConfig& c = model->config();
  J["model"] = model_dir;

  // --- GEMM: the linear shapes of this model at a 512-token prefill.
  const int M = 512;
  struct Shape {
    const char* name;
    int n, k;
  } shapes[] = {{"q/o_proj", c.q_dim(), c.hidden_size}, {"k/v_proj", c.kv_dim(), c.hidden_size},
                {"gate/up_proj", c.intermediate_size, c.hidden_size}, {"down_proj", c.hidden_size, c.intermediate_size},
                {"lm_head", c.vocab_size, c.hidden_size}};
  std::printf("fp32 GEMM, M = %d tokens, %d thread(s); OpenBLAS core: %s\n", M, nthreads, openblas_get_corename());
  std::printf("%-14s %6s %6s | %12s %12s | %7s\n", "shape", "N", "K", "spear GF/s", "OpenBLAS GF/s", "ratio");
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  double worst_ratio = 1e9;
  for (const auto& s : shapes) {
    std::vector<float> x(size_t(M) * s.k), w(size_t(s.n) * s.k), y(size_t(M) * s.n), y2(y.size());
    for (auto& v : x) v = u(rng);
    for (auto& v : w) v = u(rng);
    const double flop = 2.0 * M * s.n * s.k;
    double ours = time_median([&] { cpu_linear_f32(x.data(), M, s.k, w.data(), nullptr, s.n, y.data()); }, 7);
    double blas = time_median([&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, s.n, s.k, 1.f, x.data(), s.k, w.data(), s.k, 0.f,
                  y2.data(), s.n);
    }, 7);
    float maxdiff = 0;
    for (size_t i = 0; i < y.size(); ++i) maxdiff = std::max(maxdiff, std::fabs(y[i] - y2[i]));
    const double ratio = blas / ours;  // > 1: ours faster
    worst_ratio = std::min(worst_ratio, ratio);
    std::printf("%-14s %6d %6d | %12.1f %12.1f | %6.2fx  (max |diff| %.1e)\n", s.name, s.n, s.k, flop / ours / 1e9,
                flop / blas / 1e9, ratio, maxdiff);
    J["gemm"].push_back({{"shape", s.name}, {"M", M}, {"N", s.n}, {"K", s.k}, {"spear_gflops", flop / ours / 1e9},
                         {"openblas_gflops", flop / blas / 1e9}, {"speed_ratio_vs_openblas", ratio}});
  }
  J["gemm_worst_ratio_vs_openblas"] = worst_ratio;

  // --- End to end: prefill a 512-token prompt; decode 128 tokens after a 128-token prompt (batch 1).
  std::printf("\nend to end, batch 1, %d thread(s): prefill 512 tokens; decode 128 tokens after 128\n", nthreads);
  std::printf("%-28s %12s %14s %12s %14s %12s\n", "model", "weights MB", "prefill tok/s", "decode tok/s",
              "decode ms/tok", "vs fp32");
  std::vector<std::string> dirs = {model_dir};
  dirs.insert(dirs.end(), packages.begin(), packages.end());
  double fp32_decode = 0;
  for (const std::string& dir : dirs) {
    auto m = dir == model_dir ? std::move(model) : Model::load(dir, be);
    std::vector<int32_t> ids(512);
    std::mt19937 r2(2);
    std::uniform_int_distribution<int> tok(2, c.vocab_size - 1);
    for (auto& t : ids) t = tok(r2);
    auto cache = m->make_kv_cache(1, 512);
    double prefill = time_median([&] { m->forward(Batch::single(ids, 0), *cache, LogitsMode::LastPerSeq); }, 5);
    const int prompt = 128, steps = 128;
    double decode = time_median([&] {
      auto logits = m->forward(Batch::single(std::span<const int32_t>(ids.data(), prompt), 0), *cache,
                               LogitsMode::LastPerSeq);
      for (int i = 0; i < steps; ++i) {
        int32_t t = argmax(logits);
        logits = m->forward(Batch::single(std::span<const int32_t>(&t, 1), prompt + i), *cache, LogitsMode::LastPerSeq);
      }
    }, 3);
    double decode_prefill = time_median([&] {
      m->forward(Batch::single(std::span<const int32_t>(ids.data(), prompt), 0), *cache, LogitsMode::LastPerSeq);
    }, 3);
    const double decode_tps = steps / std::max(1e-9, decode - decode_prefill);
    if (dir == model_dir) fp32_decode = decode_tps;
    const double mb = double(m->weight_bytes()) / 1e6;
    std::printf("%-28s %12.1f %14.0f %12.1f %14.2f %11.2fx\n", std::filesystem::path(dir).filename().c_str(), mb,
                512 / prefill, decode_tps, 1e3 / decode_tps, decode_tps / fp32_decode);
    J["end_to_end"].push_back({{"model", dir},
                               {"quantized", m->package().has_value()},
                               {"resident_weight_bytes", m->weight_bytes()},
                               {"prefill_512_tokens_per_s", 512 / prefill},
                               {"decode_tokens_per_s", decode_tps},
                               {"decode_ms_per_token", 1e3 / decode_tps},
                               {"decode_speedup_vs_fp32", decode_tps / fp32_decode}});
  }
  {
    Checkpoint ck(model_dir);
    J["checkpoint_bf16_bytes"] = ck.total_bytes();
    std::printf("checkpoint tensors as stored (BF16): %.1f MB\n", double(ck.total_bytes()) / 1e6);
  }

  if (out_path.empty()) {
    std::filesystem::create_directories("bench/results");
    out_path = "bench/results/cpu-" + J["commit"].get<std::string>() + ".json";
  }
  std::ofstream(out_path) << J.dump(2) << "\n";
  std::printf("\nwrote %s\n", out_path.c_str());
  return 0;
}
