// Quantized (int4) CPU linear benchmark: quant_linear_f32 vs the fp32 Eigen path (cpu_linear_f32) on the same
// shapes in the same run, 1 thread and all threads. Prints a table and writes JSON.
//
//   build/bench/bench_int4 [--out FILE.json] [--bits 4] [--group 128] [--kernel avx512|avx2|scalar]
//                          [--quick]   (skip the 8B-like shapes)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <omp.h>

#include "backend/cpu/cpu_backend.h"
#include "bench_util.h"
#include "backend/cpu/int4_linear.h"

using namespace spear;
using clk = std::chrono::steady_clock;

namespace {

using bench::shell;

// Median seconds after one warm-up; the number of runs adapts to the duration (3..25, ~0.6 s in all).
template <typename F>
double time_median(F&& f) {
  auto t0 = clk::now();
  f();
  const double first = std::chrono::duration<double>(clk::now() - t0).count();
  const int reps = std::clamp(int(0.6 / std::max(first, 1e-7)), 3, 25);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    t0 = clk::now();
    f();
    t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path, kernel;
  int bits = 4, group = 128;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--bits" && i + 1 < argc) bits = std::atoi(argv[++i]);
    else if (a == "--group" && i + 1 < argc) group = std::atoi(argv[++i]);
    else if (a == "--kernel" && i + 1 < argc) kernel = argv[++i];
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: bench_int4 [--out FILE.json] [--bits B] [--group G] [--kernel K] [--quick]\n");
      return 2;
    }
  }
  if (!kernel.empty()) force_quant_kernel(kernel.c_str());
  const int max_threads = omp_get_max_threads();
  nlohmann::json J;
  J["commit"] = shell("git rev-parse --short HEAD 2>/dev/null");
  J["device"] = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
  J["cores"] = max_threads;
  J["date"] = shell("date -u +%Y-%m-%dT%H:%M:%SZ");
  J["kernel"] = quant_kernel_name();
  J["bits"] = bits;
  J["group_size"] = group;

  struct Shape {
    const char* name;
    int out, in;
  };
  std::vector<Shape> shapes = {{"q/o_proj", 512, 512},     {"k/v_proj", 256, 512},    {"gate/up", 1536, 512},
                               {"down", 512, 1536},        {"8B q/o", 4096, 4096},    {"8B gate/up", 14336, 4096}};
  if (quick) shapes.resize(4);
  const int Ts[] = {1, 4, 8, 64, 512};
  std::vector<int> thread_counts = {1};
  if (max_threads > 1) thread_counts.push_back(max_threads);

  std::printf("quantized linear: %d-bit, group %d, kernel %s; fp32 = cpu_linear_f32 (Eigen) on the dequantized W\n",
              bits, group, quant_kernel_name());
  std::printf("%-11s %6s %5s %4s %3s | %9s %8s %8s | %9s %8s | %7s  %s\n", "shape", "out", "in", "T", "thr", "int4 ms",
              "GB/s", "GFLOP/s", "fp32 ms", "GFLOP/s", "speedup", "max rel diff");
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (const auto& s : shapes) {
    std::vector<float> wf(size_t(s.out) * s.in);
    for (auto& v : wf) v = u(rng);
    QuantParams qp;
    qp.bits = bits;
    qp.group_size = group;
    QuantizedMatrix qm = rtn_quantize(wf.data(), s.out, s.in, qp);
    const std::vector<float> wd = qm.dequantize();  // the fp32 baseline multiplies the same (dequantized) weights
    const CpuQuantWeights cw = prepare_cpu_quant(pack_quantized(qm));
    qm = QuantizedMatrix();
    wf = std::vector<float>();
    const double qbytes = double(quant_weight_bytes(cw));
    for (int T : Ts) {
      std::vector<float> x(size_t(T) * s.in), y(size_t(T) * s.out), y32(y.size());
      for (auto& v : x) v = u(rng);
      const double flop = 2.0 * T * s.out * s.in;
      for (int nt : thread_counts) {
        omp_set_num_threads(nt);
        const double tq = time_median([&] { quant_linear_f32(x.data(), T, cw, nullptr, y.data()); });
        const double tf = time_median([&] { cpu_linear_f32(x.data(), T, s.in, wd.data(), nullptr, s.out, y32.data()); });
        double maxdiff = 0, maxref = 0;
        for (size_t i = 0; i < y.size(); ++i) {
          maxdiff = std::max(maxdiff, double(std::fabs(y[i] - y32[i])));
          maxref = std::max(maxref, double(std::fabs(y32[i])));
        }
        const double rel = maxdiff / std::max(maxref, 1e-30);
        std::printf("%-11s %6d %5d %4d %3d | %9.4f %8.2f %8.1f | %9.4f %8.1f | %6.2fx  %.1e\n", s.name, s.out, s.in, T,
                    nt, tq * 1e3, qbytes / tq / 1e9, flop / tq / 1e9, tf * 1e3, flop / tf / 1e9, tf / tq, rel);
        std::fflush(stdout);
        J["results"].push_back({{"shape", s.name},
                                {"out", s.out},
                                {"in", s.in},
                                {"T", T},
                                {"threads", nt},
                                {"int4_ms", tq * 1e3},
                                {"int4_weight_gb_per_s", qbytes / tq / 1e9},
                                {"int4_gflops", flop / tq / 1e9},
                                {"fp32_ms", tf * 1e3},
                                {"fp32_gflops", flop / tf / 1e9},
                                {"speedup_vs_fp32", tf / tq},
                                {"weight_bytes_int4", qbytes},
                                {"weight_bytes_fp32", double(wd.size()) * 4},
                                {"max_rel_diff_vs_fp32", rel}});
      }
    }
  }
  omp_set_num_threads(max_threads);

  if (out_path.empty()) {
    std::filesystem::create_directories("bench/results");
    out_path = "bench/results/int4-" + J["commit"].get<std::string>() + ".json";
  }
  std::ofstream(out_path) << J.dump(2) << "\n";
  std::printf("\nwrote %s\n", out_path.c_str());
  return 0;
}
