// W4A16 GEMM benchmark: our w4a16_gemm against cuBLAS BF16 (cublasGemmEx, bf16 in/out, fp32 compute, the
// same y = x·Wᵀ) on the linear shapes of Llama-3.2-1B and Llama-3.1-8B, M = 1..128 tokens, with the device's
// copy bandwidth as the yardstick for the weight-streaming rate.
//
//   build/bench/bench_w4_gemm [--quick] [--decode] [--prefill] [--no-pdl] [--no-tune] [--reps N] [--out FILE.json]
//                             [--help]
//
// Method:
//  * peak: cudaMemcpyAsync device-to-device of 1 GiB, bytes read + written / time (median of 10);
//  * each shape rotates among enough copies of its weights (W4 and BF16 separately) that one rotation is at
//    least 4× the L2 size, so every timed call streams its weights from DRAM;
//  * all calls of a measurement are queued behind a host gate (a stream callback that waits until the
//    whole batch is enqueued), then timed one by one with CUDA events: warm-up calls, then the median of
//    --reps (default 30, at least 20) timings;
//  * M <= 32: the decode kernel's plan is tuned first (w4a16_tune_decode, L2 flushed before each timed call), as
//    the engine does at its first step; --no-tune keeps the time model's plan;
//  * the W4 weights are random codes, scales and zeros (the timing does not depend on them); our output is
//    checked against the reference kernel once per shape and M (rel err = ‖y − ref‖ / ‖ref‖, max err =
//    max |y − ref| / max |ref|; the bf16 rounding of y alone gives ~1e-3 and ~4e-3);
//  * W4 GB/s counts the bytes of codes + scales + zeros of the padded device layout; "% copy" is that rate
//    over the measured copy bandwidth;
//  * "b2b us" times --reps calls queued back to back between one pair of events (per call: total / reps,
//    median of 5 batches), as a decode step replays them in a CUDA graph: no per-call event overhead, and
//    programmatic dependent launch (on by default) overlaps a call's start with the previous call's end;
//  * grouped rows (module "qkv*" / "gate+up*"): one w4a16_gemm_grouped launch over q/k/v (or gate/up), which
//    share x, against cuBLAS BF16 on the fused [sum of n, k] matrix; M = 1, 8, 16;
//  * the summary: per model, W4 at M <= 16 versus the goals (8B: >= 80% of copy bandwidth, >= 3.3x cuBLAS
//    BF16) and the W4 GEMM time of one decode step (M = 1, b2b: grouped q/k/v + o + grouped gate/up + down,
//    times the layers) against the 1B budget (<= 0.40 ms per token for the whole step).
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cublas_v2.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_gemm.h"
#include "bench_util.h"
#include "core/dtype.h"
#include "core/error.h"

using namespace spear;

namespace {

using bench::shell;

#define BENCH_CUBLAS_CHECK(expr)                                                      \
  do {                                                                                \
    cublasStatus_t st_ = (expr);                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error {} at {}: {}", int(st_), __LINE__, #expr); \
  } while (0)

// Device memory that frees itself.
class DeviceMem {
 public:
  explicit DeviceMem(size_t bytes) : bytes_(bytes) { SPEAR_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(bytes, 16))); }
  ~DeviceMem() { cudaFree(p_); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <typename T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(p_) + byte_offset);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Holds the stream until release(): everything enqueued meanwhile runs back to back, so event timings do
// not include host launch latency. Gives up after 10 s rather than dead-locking on a full launch queue.
class HostGate {
 public:
  explicit HostGate(cudaStream_t s) {
    SPEAR_CUDA_CHECK(cudaLaunchHostFunc(s, &HostGate::wait, &open_));
  }
  void release() { open_.store(true); }

 private:
  static void wait(void* p) {
    auto* open = static_cast<std::atomic<bool>*>(p);
    const auto t0 = std::chrono::steady_clock::now();
    while (!open->load()) {
      if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(10)) {
        std::fprintf(stderr, "bench_w4_gemm: warning: host gate timed out (launch queue full?); timings of this "
                             "measurement include launch latency\n");
        return;
      }
      std::this_thread::yield();
    }
  }
  std::atomic<bool> open_{false};
};

// Median time in µs of `reps` calls of f(i) (after `warmup` calls), each between its own pair of events.
template <typename F>
double time_median_us(cudaStream_t s, int warmup, int reps, F&& f) {
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) SPEAR_CUDA_CHECK(cudaEventCreate(&e));
  {
    HostGate gate(s);
    for (int i = 0; i < warmup; ++i) f(i);
    for (int i = 0; i < reps; ++i) {
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
      f(warmup + i);
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
    }
    gate.release();
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  std::vector<double> t(reps);
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    t[i] = ms * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Per-call time in µs of `reps` calls queued back to back between one pair of events (after `warmup` calls),
// median over `batches` batches.
template <typename F>
double time_back_to_back_us(cudaStream_t s, int warmup, int reps, F&& f, int batches = 5) {
  cudaEvent_t e0, e1;
  SPEAR_CUDA_CHECK(cudaEventCreate(&e0));
  SPEAR_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> t;
  int call = 0;
  for (int b = 0; b < batches; ++b) {
    {
      HostGate gate(s);
      for (int i = 0; i < warmup; ++i) f(call++);
      SPEAR_CUDA_CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < reps; ++i) f(call++);
      SPEAR_CUDA_CHECK(cudaEventRecord(e1, s));
      gate.release();
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    float ms = 0;
    SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3 / reps);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Device-to-device copy of 1 GiB; bytes read + written per second.
double copy_bandwidth_gbps(cudaStream_t s) {
  const size_t bytes = size_t(1) << 30;
  DeviceMem a(bytes), b(bytes);
  SPEAR_CUDA_CHECK(cudaMemsetAsync(a.as<void>(), 1, bytes, s));
  const double us = time_median_us(s, 2, 10, [&](int) {
    SPEAR_CUDA_CHECK(cudaMemcpyAsync(b.as<void>(), a.as<void>(), bytes, cudaMemcpyDeviceToDevice, s));
  });
  return 2.0 * double(bytes) / (us * 1e-6) / 1e9;
}

// Random codes, scales and zeros in the canonical packed layout (values do not change the timing).
PackedQuantWeights random_packed(int out, int in, int group, uint32_t seed) {
  std::mt19937 rng(seed);
  PackedQuantWeights p;
  p.out = out;
  p.in = in;
  p.bits = 4;
  p.group_size = group;
  p.container_bits = 4;
  p.qweight.resize(size_t(out) * p.row_bytes());
  for (auto& b : p.qweight) b = uint8_t(rng());
  if (in % 2) {  // the canonical layout keeps the last high nibble of odd rows at 0
    for (int r = 0; r < out; ++r) p.qweight[size_t(r) * p.row_bytes() + p.row_bytes() - 1] &= 0x0f;
  }
  std::uniform_real_distribution<float> us(0.5e-3f, 2e-3f);
  p.scales.resize(size_t(out) * p.groups());
  p.zeros.resize(p.scales.size());
  for (auto& s : p.scales) s = us(rng);
  for (auto& z : p.zeros) z = uint8_t(rng() % 16);
  return p;
}

std::string device_slug(std::string name) {
  for (auto& c : name) c = std::isalnum(static_cast<unsigned char>(c)) ? char(std::tolower(c)) : '-';
  std::string out;
  for (char c : name)
    if (!(c == '-' && (out.empty() || out.back() == '-'))) out += c;
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "gpu" : out;
}

struct Shape {
  std::string model, module;
  int n, k;
  std::vector<int> groups;  // -1 = per channel
};

struct Row {
  std::string model, module;
  int n, k, m, group;
  double w4_us, bf16_us, w4_gbps, pct_copy, rel_err, max_err;  // errors vs the reference kernel
  double b2b_us = 0, b2b_pct_copy = 0;
  std::string plan = "general";  // the decode kernel's "R<tiles per CTA>S<CTAs per cluster>", or the general kernel
};

// Enough copies of a set of W4 matrices (uploaded one after the other) that one rotation streams at least
// rotation_bytes: views[copy][matrix].
struct RotatingW4 {
  std::unique_ptr<DeviceMem> mem;
  std::vector<std::vector<cuda::W4Device>> views;
  size_t bytes_per_copy = 0;  // codes + scales + zeros of one copy of every matrix
  int copies() const { return int(views.size()); }
};

RotatingW4 upload_rotating(const std::vector<const cuda::W4Layout*>& lays, size_t rotation_bytes) {
  RotatingW4 r;
  size_t stride = 0;
  for (const cuda::W4Layout* l : lays) {
    const size_t qb = l->q.size() * 4, sb = l->scales.size() * 4, zb = l->zeros.size() * 2;
    r.bytes_per_copy += qb + sb + zb;
    stride += align_up(qb, 256) + align_up(sb, 256) + align_up(zb, 256);
  }
  const int copies = int(std::max<size_t>(2, (rotation_bytes + r.bytes_per_copy - 1) / r.bytes_per_copy));
  r.mem = std::make_unique<DeviceMem>(stride * copies);
  r.views.resize(copies);
  for (int c = 0; c < copies; ++c) {
    size_t off = size_t(c) * stride;
    for (const cuda::W4Layout* l : lays) {
      const size_t qb = l->q.size() * 4, sb = l->scales.size() * 4, zb = l->zeros.size() * 2;
      uint32_t* q = r.mem->as<uint32_t>(off);
      float* sc = r.mem->as<float>(off + align_up(qb, 256));
      uint16_t* z = r.mem->as<uint16_t>(off + align_up(qb, 256) + align_up(sb, 256));
      SPEAR_CUDA_CHECK(cudaMemcpy(q, l->q.data(), qb, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemcpy(sc, l->scales.data(), sb, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemcpy(z, l->zeros.data(), zb, cudaMemcpyHostToDevice));
      r.views[c].push_back(cuda::W4Device{l->n, l->k, l->n_pad, l->k_pad, l->group_size, l->groups, q, sc, z});
      off += align_up(qb, 256) + align_up(sb, 256) + align_up(zb, 256);
    }
  }
  return r;
}

// ‖y − ref‖ / ‖ref‖ and max |y − ref| / max |ref| of a bf16 device output against a float device reference.
void compare_outputs(const __nv_bfloat16* y, const float* yref, size_t count, double* rel, double* max_rel) {
  std::vector<uint16_t> got(count);
  std::vector<float> ref(count);
  SPEAR_CUDA_CHECK(cudaMemcpy(got.data(), y, count * 2, cudaMemcpyDeviceToHost));
  SPEAR_CUDA_CHECK(cudaMemcpy(ref.data(), yref, count * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0, max_d = 0, max_r = 0;
  for (size_t i = 0; i < count; ++i) {
    const double d = double(bf16_to_f32(got[i])) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
    max_d = std::max(max_d, std::isfinite(d) ? std::fabs(d) : INFINITY);
    max_r = std::max(max_r, double(std::fabs(ref[i])));
  }
  *rel = std::sqrt(num / std::max(den, 1e-30));
  *max_rel = max_d / std::max(max_r, 1e-30);
}

std::string plan_name(std::pair<int, int> rs) {
  if (rs.first < 0) return "bulk";
  return rs.first ? "R" + std::to_string(rs.first) + "S" + std::to_string(rs.second) : "general";
}

void print_row(const Row& r) {
  std::printf("%-13s %-12s %6d %6d %4d %5s %9.2f %9.2f %7.2fx %8.0f %6.1f%% %9.2e %9.2e %8.2f %6.1f%% %s\n",
              r.model.c_str(), r.module.c_str(), r.n, r.k, r.m, r.group < 0 ? "chan" : std::to_string(r.group).c_str(),
              r.w4_us, r.bf16_us, r.bf16_us / r.w4_us, r.w4_gbps, r.pct_copy, r.rel_err, r.max_err, r.b2b_us,
              r.b2b_pct_copy, r.plan.c_str());
  std::fflush(stdout);
}

struct Model {
  std::string name;
  int hidden, kv, inter, layers;
};

// --prefill: the prefill-sized GEMMs (M = 32..2048, group 128) through the three ways the engine could run
// them: the W4 kernel (general path, 128-token chunks), dequantization into a bf16 scratch matrix + cuBLAS
// BF16 (what CudaBackend does from SPEAR_W4_DEQUANT_MIN_M tokens on), and cuBLAS BF16 on bf16 weights (the
// unquantized model). One copy of the weights (these GEMMs are compute-bound); errors of the dequantized
// path against the reference kernel.
nlohmann::json prefill_section(cudaStream_t stream, cublasHandle_t cublas, int sm_count, int reps) {
  struct P {
    const char* model;
    const char* module;
    int n, k;
  };
  const P shapes[] = {{"llama-3.2-1b", "gate/up", 8192, 2048}, {"llama-3.1-8b", "q/o", 4096, 4096},
                      {"llama-3.1-8b", "gate/up", 14336, 4096}, {"llama-3.1-8b", "down", 4096, 14336}};
  const int ms[] = {32, 64, 128, 256, 512, 1024, 2048};
  const int max_m = 2048;
  std::printf("\nprefill GEMMs (group 128): W4 kernel vs dequantize + cuBLAS BF16 vs cuBLAS BF16 on bf16 weights\n");
  std::printf("%-13s %-8s %6s %6s %5s %10s %10s %9s %10s %9s %9s %9s\n", "model", "module", "N", "K", "M", "W4 us",
              "deq+BF16", "deq us", "BF16 us", "W4 TF/s", "deq TF/s", "rel err");
  nlohmann::json out = nlohmann::json::array();
  const float alpha = 1.f, beta = 0.f;
  uint32_t seed = 100;
  for (const P& s : shapes) {
    const cuda::W4Layout lay = cuda::w4_prepare(random_packed(s.n, s.k, 128, seed++));
    DeviceMem q(lay.q.size() * 4), sc(lay.scales.size() * 4), z(lay.zeros.size() * 2);
    SPEAR_CUDA_CHECK(cudaMemcpy(q.as<void>(), lay.q.data(), q.bytes(), cudaMemcpyHostToDevice));
    SPEAR_CUDA_CHECK(cudaMemcpy(sc.as<void>(), lay.scales.data(), sc.bytes(), cudaMemcpyHostToDevice));
    SPEAR_CUDA_CHECK(cudaMemcpy(z.as<void>(), lay.zeros.data(), z.bytes(), cudaMemcpyHostToDevice));
    const cuda::W4Device w{lay.n, lay.k, lay.n_pad, lay.k_pad, lay.group_size, lay.groups, q.as<uint32_t>(),
                           sc.as<float>(), z.as<uint16_t>()};
    DeviceMem deq(size_t(s.n) * s.k * 2), x(size_t(max_m) * s.k * 2), y(size_t(max_m) * s.n * 2),
        yref(size_t(max_m) * s.n * 4);
    const size_t ws_bytes = cuda::w4a16_workspace_bytes(128, s.n, s.k, sm_count);
    DeviceMem ws(ws_bytes);
    SPEAR_CUDA_CHECK(cudaMemset(ws.as<void>(), 0, ws_bytes));
    {
      std::mt19937 rng(seed);
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<uint16_t> xh(size_t(max_m) * s.k);
      for (auto& v : xh) v = f32_to_bf16(nd(rng));
      SPEAR_CUDA_CHECK(cudaMemcpy(x.as<void>(), xh.data(), xh.size() * 2, cudaMemcpyHostToDevice));
    }
    const auto* xp = x.as<const __nv_bfloat16>();
    auto* yp = y.as<__nv_bfloat16>();
    auto* dp = deq.as<__nv_bfloat16>();
    for (int m : ms) {
      auto gemm = [&](int) {
        BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, dp, CUDA_R_16BF, s.k,
                                        xp, CUDA_R_16BF, s.k, &beta, yp, CUDA_R_16BF, s.n, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT));
      };
      auto run_deq = [&](int) { cuda::w4a16_dequantize(w, dp, stream); };
      auto run_w4 = [&](int) {
        cuda::w4a16_gemm(xp, m, w, nullptr, yp, ws.as<void>(), ws_bytes, sm_count, stream);
      };
      run_deq(0), gemm(0), run_w4(0);
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
      const double w4_us = time_median_us(stream, 3, reps, run_w4);
      const double deq_us = time_median_us(stream, 3, reps, run_deq);
      const double bf16_us = time_median_us(stream, 3, reps, gemm);
      const double both_us = time_median_us(stream, 3, reps, [&](int i) { run_deq(i), gemm(i); });
      run_deq(0), gemm(0);
      cuda::w4a16_gemm_reference(xp, m, w, nullptr, yref.as<float>(), stream);
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
      double rel = 0, max_rel = 0;
      compare_outputs(yp, yref.as<float>(), size_t(m) * s.n, &rel, &max_rel);
      const double flop = 2.0 * m * double(s.n) * s.k;
      std::printf("%-13s %-8s %6d %6d %5d %10.1f %10.1f %9.1f %10.1f %9.0f %9.0f %9.2e\n", s.model, s.module, s.n,
                  s.k, m, w4_us, both_us, deq_us, bf16_us, flop / w4_us * 1e-6, flop / both_us * 1e-6, rel);
      std::fflush(stdout);
      out.push_back({{"model", s.model}, {"module", s.module}, {"n", s.n}, {"k", s.k}, {"m", m}, {"w4_us", w4_us},
                     {"dequant_cublas_us", both_us}, {"dequant_us", deq_us}, {"bf16_cublas_us", bf16_us},
                     {"dequant_cublas_rel_err", rel}});
    }
  }
  return out;
}

void usage() {
  std::printf(
      "usage: bench_w4_gemm [--quick] [--decode] [--prefill] [--no-pdl] [--no-tune] [--reps N] [--out FILE.json]\n"
      "                     [--help]\n"
      "  W4A16 GEMM (w4a16_gemm) vs cuBLAS BF16 on the Llama-3.2-1B / Llama-3.1-8B linear shapes, M = 1..128.\n"
      "  --quick    a smoke run: 8B k/v and down only, M = 1, 16, 128\n"
      "  --decode   only the goal's rows: 8B shapes (and grouped launches) at M = 1..16\n"
      "  --prefill  only the prefill table: M = 32..2048, W4 kernel vs dequantize + cuBLAS vs cuBLAS BF16\n"
      "  --no-pdl   launch without programmatic dependent launch (SPEAR_W4_* environment knobs also apply)\n"
      "  --no-tune  keep the decode kernel's modelled plan (default: tune each shape first, as the engine does)\n"
      "  --reps N   timed calls per measurement (median; default 30, at least 20)\n"
      "  --out F    JSON output (default bench/results/w4_gemm-<commit>-<device>.json)\n");
}

}  // namespace

int main(int argc, char** argv) try {
  std::string out_path;
  bool quick = false, tune = true, prefill_only = false, decode_only = false;
  int reps = 30;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::max(20, std::atoi(argv[++i]));
    else if (a == "--quick") quick = true;
    else if (a == "--decode") decode_only = true;
    else if (a == "--prefill") prefill_only = true;
    else if (a == "--no-tune") tune = false;
    else if (a == "--no-pdl") {
      cuda::W4GemmOptions o = cuda::w4a16_get_options();
      o.pdl = false;
      cuda::w4a16_set_options(o);
    }
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  reps = std::min(reps, 200);  // the host gate holds every call of a measurement in the launch queue
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_w4_gemm: no CUDA device\n");
    return 1;
  }
  SPEAR_CUDA_CHECK(cudaSetDevice(0));
  const cuda::DeviceInfo dev = cuda::device_info(0);
  const size_t l2 = dev.l2_bytes ? dev.l2_bytes : size_t(60) << 20;
  const size_t rotation_bytes = 4 * l2;  // weights streamed per rotation: at least 4 × L2
  cudaStream_t stream;
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t cublas;
  BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
  BENCH_CUBLAS_CHECK(cublasSetStream(cublas, stream));

  const double copy_gbps = copy_bandwidth_gbps(stream);
  std::printf("device: %s (%d SMs, L2 %.0f MB); copy bandwidth (D2D, read + write): %.0f GB/s\n\n", dev.name.c_str(),
              dev.sm_count, l2 / 1e6, copy_gbps);

  if (prefill_only) {
    nlohmann::json J;
    J["commit"] = shell("git rev-parse --short HEAD 2>/dev/null");
    J["device"] = dev.name;
    J["prefill"] = prefill_section(stream, cublas, dev.sm_count, reps);
    if (out_path.empty()) out_path = "bench/results/w4_prefill-" + J["commit"].get<std::string>() + ".json";
    std::ofstream(out_path) << J.dump(2) << "\n";
    std::printf("wrote %s\n", out_path.c_str());
    return 0;
  }

  std::vector<Shape> shapes;
  if (quick) {
    shapes = {{"llama-3.1-8b", "k/v", 1024, 4096, {-1}}, {"llama-3.1-8b", "down", 4096, 14336, {-1, 128}}};
  } else {
    shapes = {{"llama-3.2-1b", "q/o", 2048, 2048, {-1}},        {"llama-3.2-1b", "k/v", 512, 2048, {-1}},
              {"llama-3.2-1b", "gate/up", 8192, 2048, {-1}},    {"llama-3.2-1b", "down", 2048, 8192, {-1}},
              {"llama-3.1-8b", "q/o", 4096, 4096, {-1, 128}},   {"llama-3.1-8b", "k/v", 1024, 4096, {-1, 128}},
              {"llama-3.1-8b", "gate/up", 14336, 4096, {-1, 128}}, {"llama-3.1-8b", "down", 4096, 14336, {-1, 128}}};
  }
  if (decode_only && !quick)
    shapes.erase(std::remove_if(shapes.begin(), shapes.end(), [](const Shape& s) { return s.model != "llama-3.1-8b"; }),
                 shapes.end());
  const std::vector<int> ms = quick          ? std::vector<int>{1, 16, 128}
                              : decode_only ? std::vector<int>{1, 2, 4, 8, 16}
                                            : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128};
  const int max_m = *std::max_element(ms.begin(), ms.end());
  int max_n = 0, max_k = 0;
  for (const Shape& s : shapes) {
    max_n = std::max(max_n, s.n);
    max_k = std::max(max_k, s.k);
  }
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(max_m, max_n, max_k, dev.sm_count);
  DeviceMem ws(ws_bytes);
  DeviceMem flush(2 * l2);  // written before each timed tuning call: weights come from DRAM
  SPEAR_CUDA_CHECK(cudaMemset(ws.as<void>(), 0, ws_bytes));

  std::printf("%-13s %-12s %6s %6s %4s %5s %9s %9s %8s %8s %7s %9s %9s %8s %7s\n", "model", "module", "N", "K",
              "M", "group", "W4 us", "BF16 us", "speedup", "W4 GB/s", "% copy", "rel err", "max err", "b2b us",
              "b2b %cp  plan");
  std::vector<Row> rows;
  std::mt19937 rng(1);
  uint32_t seed = 1;
  const float alpha = 1.f, beta = 0.f;
  const int b2b_reps = std::max(reps, 50);
  for (const Shape& s : shapes) {
    // BF16 weights for cuBLAS: contents do not matter for timing (a constant pattern).
    const size_t bf16_bytes = size_t(s.n) * s.k * 2;
    const size_t bf16_stride = align_up(bf16_bytes, 256);
    const int bf16_copies = int(std::max<size_t>(2, (rotation_bytes + bf16_bytes - 1) / bf16_bytes));
    DeviceMem wbf(bf16_stride * bf16_copies);
    SPEAR_CUDA_CHECK(cudaMemset(wbf.as<void>(), 0x3c, wbf.bytes()));  // bf16 0x3c3c ≈ 0.0115

    DeviceMem x(size_t(max_m) * s.k * 2), y(size_t(max_m) * s.n * 2), yref(size_t(max_m) * s.n * 4);
    {
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<uint16_t> xh(size_t(max_m) * s.k);
      for (auto& v : xh) v = f32_to_bf16(nd(rng));
      SPEAR_CUDA_CHECK(cudaMemcpy(x.as<void>(), xh.data(), xh.size() * 2, cudaMemcpyHostToDevice));
    }

    for (int group : s.groups) {
      const cuda::W4Layout lay = cuda::w4_prepare(random_packed(s.n, s.k, group, seed++));
      const RotatingW4 rot = upload_rotating({&lay}, rotation_bytes);
      const int w4_copies = rot.copies();
      const size_t w4_bytes = rot.bytes_per_copy;
      const auto* xp = x.as<const __nv_bfloat16>();
      auto* yp = y.as<__nv_bfloat16>();

      for (int m : ms) {
        auto run_w4 = [&](int i) {
          cuda::w4a16_gemm(xp, m, rot.views[i % w4_copies][0], nullptr, yp, ws.as<void>(), ws_bytes, dev.sm_count,
                           stream);
        };
        auto run_bf16 = [&](int i) {
          const void* wp = wbf.as<char>(size_t(i % bf16_copies) * bf16_stride);
          BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, wp, CUDA_R_16BF, s.k,
                                          xp, CUDA_R_16BF, s.k, &beta, yp, CUDA_R_16BF, s.n, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
        };
        // One ungated call each first: lazy initialization (cuBLAS may allocate) must not happen behind the gate.
        if (tune) {
          __nv_bfloat16* yt = yp;
          cuda::w4a16_tune_decode(xp, m, &rot.views[0][0], 1, &yt, flush.as<void>(), flush.bytes(), dev.sm_count,
                                  stream, 5, nullptr, nullptr, nullptr, ws.as<void>(), ws_bytes);
        }
        run_w4(0);
        run_bf16(0);
        SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
        const double w4_us = time_median_us(stream, std::min(30, 3 * w4_copies), reps, run_w4);
        const double bf16_us = time_median_us(stream, std::min(30, 3 * bf16_copies), reps, run_bf16);
        const double b2b_us = time_back_to_back_us(stream, std::min(30, 3 * w4_copies), b2b_reps, run_w4);
        Row r{s.model, s.module, s.n, s.k, m, group, w4_us, bf16_us, 0, 0, 0, 0};
        r.plan = plan_name(cuda::w4a16_decode_plan(m, &rot.views[0][0], 1, dev.sm_count));
        // Our output (after the timing loops, on a shared workspace) against the reference kernel.
        cuda::w4a16_gemm(xp, m, rot.views[0][0], nullptr, yp, ws.as<void>(), ws_bytes, dev.sm_count, stream);
        cuda::w4a16_gemm_reference(xp, m, rot.views[0][0], nullptr, yref.as<float>(), stream);
        SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
        compare_outputs(yp, yref.as<float>(), size_t(m) * s.n, &r.rel_err, &r.max_err);
        r.w4_gbps = double(w4_bytes) / (w4_us * 1e-6) / 1e9;
        r.pct_copy = 100.0 * r.w4_gbps / copy_gbps;
        r.b2b_us = b2b_us;
        r.b2b_pct_copy = 100.0 * double(w4_bytes) / (b2b_us * 1e-6) / 1e9 / copy_gbps;
        rows.push_back(r);
        print_row(r);
      }
    }
  }

  // Grouped launches: q/k/v and gate/up of each model, which share their input x.
  std::vector<Model> models;
  if (!quick && !decode_only) models.push_back({"llama-3.2-1b", 2048, 512, 8192, 16});
  models.push_back({"llama-3.1-8b", 4096, 1024, 14336, 32});
  const std::vector<int> grouped_ms = quick ? std::vector<int>{1, 16} : std::vector<int>{1, 8, 16};
  for (const Model& md : models) {
    const int k = md.hidden;
    struct Set {
      std::string module;
      std::vector<int> ns;
    };
    const Set sets[] = {{"qkv", {md.hidden, md.kv, md.kv}}, {"gate+up", {md.inter, md.inter}}};
    DeviceMem x(size_t(16) * k * 2);
    {
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<uint16_t> xh(size_t(16) * k);
      for (auto& v : xh) v = f32_to_bf16(nd(rng));
      SPEAR_CUDA_CHECK(cudaMemcpy(x.as<void>(), xh.data(), xh.size() * 2, cudaMemcpyHostToDevice));
    }
    const auto* xp = x.as<const __nv_bfloat16>();
    for (const Set& set : sets) {
      const int count = int(set.ns.size());
      int n_sum = 0;
      for (int n : set.ns) n_sum += n;
      // cuBLAS baseline: one fused [n_sum, k] BF16 matrix (what a BF16 engine would run).
      const size_t bf16_bytes = size_t(n_sum) * k * 2;
      const size_t bf16_stride = align_up(bf16_bytes, 256);
      const int bf16_copies = int(std::max<size_t>(2, (rotation_bytes + bf16_bytes - 1) / bf16_bytes));
      DeviceMem wbf(bf16_stride * bf16_copies);
      SPEAR_CUDA_CHECK(cudaMemset(wbf.as<void>(), 0x3c, wbf.bytes()));
      DeviceMem y(size_t(16) * n_sum * 2), yref(size_t(16) * n_sum * 4);
      for (int group : quick || md.layers < 32 ? std::vector<int>{-1} : std::vector<int>{-1, 128}) {
        std::vector<cuda::W4Layout> lays;
        for (int n : set.ns) lays.push_back(cuda::w4_prepare(random_packed(n, k, group, seed++)));
        std::vector<const cuda::W4Layout*> lp;
        for (const auto& l : lays) lp.push_back(&l);
        const RotatingW4 rot = upload_rotating(lp, rotation_bytes);
        std::vector<__nv_bfloat16*> ys;
        size_t off = 0;
        for (int m : grouped_ms) {
          ys.clear();
          off = 0;
          for (int n : set.ns) {
            ys.push_back(y.as<__nv_bfloat16>(off * 2));
            off += size_t(m) * n;
          }
          auto run_w4 = [&](int i) {
            cuda::w4a16_gemm_grouped(xp, m, rot.views[i % rot.copies()].data(), count, nullptr, ys.data(),
                                     ws.as<void>(), ws_bytes, dev.sm_count, stream);
          };
          auto run_bf16 = [&](int i) {
            const void* wp = wbf.as<char>(size_t(i % bf16_copies) * bf16_stride);
            BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_sum, m, k, &alpha, wp, CUDA_R_16BF, k,
                                            xp, CUDA_R_16BF, k, &beta, y.as<void>(), CUDA_R_16BF, n_sum,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          };
          if (tune)
            cuda::w4a16_tune_decode(xp, m, rot.views[0].data(), count, ys.data(), flush.as<void>(), flush.bytes(),
                                    dev.sm_count, stream, 5, nullptr, nullptr, nullptr, ws.as<void>(), ws_bytes);
          run_w4(0);
          run_bf16(0);
          SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
          const int w4_warm = std::min(30, 3 * rot.copies()), bf_warm = std::min(30, 3 * bf16_copies);
          const double w4_us = time_median_us(stream, w4_warm, reps, run_w4);
          const double bf16_us = time_median_us(stream, bf_warm, reps, run_bf16);
          const double b2b_us = time_back_to_back_us(stream, w4_warm, b2b_reps, run_w4);
          Row r{md.name, set.module + "(grp)", n_sum, k, m, group, w4_us, bf16_us, 0, 0, 0, 0};
          r.plan = plan_name(cuda::w4a16_decode_plan(m, rot.views[0].data(), count, dev.sm_count));
          run_w4(0);
          size_t roff = 0;
          for (int i = 0; i < count; ++i) {
            cuda::w4a16_gemm_reference(xp, m, rot.views[0][i], nullptr, yref.as<float>(roff * 4), stream);
            roff += size_t(m) * set.ns[i];
          }
          SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
          compare_outputs(y.as<__nv_bfloat16>(), yref.as<float>(), roff, &r.rel_err, &r.max_err);
          r.w4_gbps = double(rot.bytes_per_copy) / (w4_us * 1e-6) / 1e9;
          r.pct_copy = 100.0 * r.w4_gbps / copy_gbps;
          r.b2b_us = b2b_us;
          r.b2b_pct_copy = 100.0 * double(rot.bytes_per_copy) / (b2b_us * 1e-6) / 1e9 / copy_gbps;
          rows.push_back(r);
          print_row(r);
        }
      }
    }
  }

  // The goals: 8B shapes at M <= 16 — W4 at >= 80% of copy bandwidth and >= 3.3x cuBLAS BF16; 1B decode step
  // <= 0.40 ms per token overall (the W4 GEMMs are most of it).
  std::printf("\n");
  double err_max = 0;
  for (const Row& r : rows) err_max = std::max(err_max, r.rel_err);
  for (const char* model : {"llama-3.2-1b", "llama-3.1-8b"})
    for (bool decode : {true, false}) {
      double pct_min = 1e9, pct_max = 0, sp_min = 1e9, sp_max = 0, b2b_min = 1e9, b2b_max = 0;
      for (const Row& r : rows) {
        if (r.model != model || (r.m <= 16) != decode) continue;
        pct_min = std::min(pct_min, r.pct_copy);
        pct_max = std::max(pct_max, r.pct_copy);
        b2b_min = std::min(b2b_min, r.b2b_pct_copy);
        b2b_max = std::max(b2b_max, r.b2b_pct_copy);
        sp_min = std::min(sp_min, r.bf16_us / r.w4_us);
        sp_max = std::max(sp_max, r.bf16_us / r.w4_us);
      }
      if (pct_max == 0) continue;
      std::printf("%s, %s: W4 at %.0f-%.0f%% of copy bandwidth (b2b %.0f-%.0f%%), %.2f-%.2fx cuBLAS BF16\n", model,
                  decode ? "M <= 16" : "M 32..128", pct_min, pct_max, b2b_min, b2b_max, sp_min, sp_max);
    }
  // 8B goal check on the large decode shapes (each matrix >= 16 MB: where bandwidth, not latency, decides).
  {
    int pass = 0, total = 0;
    for (const Row& r : rows) {
      if (r.model != "llama-3.1-8b" || r.m > 16 || double(r.n) * r.k / 2 < 16e6) continue;
      ++total;
      pass += r.b2b_pct_copy >= 80.0 && r.bf16_us / r.w4_us >= 3.3;
    }
    if (total)
      std::printf("llama-3.1-8b, M <= 16, matrices >= 16 MB: %d of %d rows meet >= 80%% copy bandwidth (b2b) and "
                  ">= 3.3x cuBLAS\n",
                  pass, total);
  }
  // One decode step's W4 GEMMs (M = 1, per channel, back to back), grouped vs separate launches.
  auto find = [&](const std::string& model, const std::string& module, int m) -> const Row* {
    for (const Row& r : rows)
      if (r.model == model && r.module == module && r.m == m && r.group < 0) return &r;
    return nullptr;
  };
  for (const Model& md : models) {
    const Row *qo = find(md.name, "q/o", 1), *kv = find(md.name, "k/v", 1), *gu = find(md.name, "gate/up", 1),
              *dn = find(md.name, "down", 1), *qkv = find(md.name, "qkv(grp)", 1),
              *gug = find(md.name, "gate+up(grp)", 1);
    if (!qo || !kv || !gu || !dn) continue;
    const double separate = md.layers * (2 * qo->b2b_us + 2 * kv->b2b_us + 2 * gu->b2b_us + dn->b2b_us) / 1e3;
    std::printf("%s decode step, W4 GEMMs at M = 1 (b2b): %d separate launches %.3f ms", md.name.c_str(),
                7 * md.layers, separate);
    if (qkv && gug) {
      const double grouped = md.layers * (qkv->b2b_us + qo->b2b_us + gug->b2b_us + dn->b2b_us) / 1e3;
      std::printf(", %d launches with grouped q/k/v and gate/up %.3f ms", 4 * md.layers, grouped);
    }
    if (md.layers == 16) std::printf(" (goal: whole step <= 0.40 ms per token)");
    std::printf("\n");
  }
  std::printf("goals: 8B at M <= 16 >= 80%% of copy bandwidth and >= 3.3x cuBLAS; 1B decode <= 0.40 ms per token; "
              "max rel err %.2e (bf16 output: ~1e-3)\n",
              err_max);

  nlohmann::json J;
  J["commit"] = shell("git rev-parse --short HEAD 2>/dev/null");
  J["device"] = dev.name;
  J["sm_count"] = dev.sm_count;
  J["l2_bytes"] = l2;
  J["date"] = shell("date -u +%Y-%m-%dT%H:%M:%SZ");
  J["copy_bandwidth_gbps"] = copy_gbps;
  J["reps"] = reps;
  J["quick"] = quick;
  J["decode_only"] = decode_only;
  J["bulk_min_blocks"] = cuda::w4a16_get_options().bulk_min_blocks;  // SPEAR_W4_BULK_OCC
  J["tuned_decode_plans"] = tune;
  J["workspace_bytes"] = ws_bytes;
  {
    const cuda::W4GemmOptions o = cuda::w4a16_get_options();
    J["options"] = {{"pdl", o.pdl}, {"path", o.path}, {"decode_rows", o.decode_rows},
                    {"decode_splits", o.decode_splits}};
  }
  for (const Row& r : rows)
    J["rows"].push_back({{"model", r.model},
                         {"module", r.module},
                         {"n", r.n},
                         {"k", r.k},
                         {"m", r.m},
                         {"group_size", r.group},
                         {"w4_us", r.w4_us},
                         {"bf16_us", r.bf16_us},
                         {"speedup", r.bf16_us / r.w4_us},
                         {"w4_weight_gbps", r.w4_gbps},
                         {"pct_copy_bandwidth", r.pct_copy},
                         {"rel_err", r.rel_err},
                         {"max_abs_err_over_max_ref", r.max_err},
                         {"w4_us_back_to_back", r.b2b_us},
                         {"pct_copy_bandwidth_back_to_back", r.b2b_pct_copy},
                         {"plan", r.plan}});
  if (out_path.empty()) {
    std::filesystem::create_directories("bench/results");
    std::string commit = J["commit"].get<std::string>();
    out_path = "bench/results/w4_gemm-" + (commit.empty() ? std::string("nocommit") : commit) + "-" +
               device_slug(dev.name) + ".json";
  }
  std::ofstream(out_path) << J.dump(2) << "\n";
  std::printf("wrote %s\n", out_path.c_str());
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_w4_gemm: %s\n", e.what());
  return 1;
}
