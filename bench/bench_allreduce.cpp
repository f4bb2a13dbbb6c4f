// All-reduce of small bf16 messages (8 KB .. 1 MB) between the GPUs of one host: our P2P dual-write kernel
// (p2p_allreduce_bf16) against NCCL all-reduce (ncclBfloat16, ncclSum, in place), same buffers, same run. The
// tensor-parallel decode step reduces a few KB to a few hundred KB per layer, where latency, not bandwidth, rules.
//
//   build/bench/bench_allreduce [--out FILE.json] [--help]      (run from the repository root)
//
// Method:
//  * R = number of visible GPUs, at most 4 (at least 2, else a message and exit 0); one process, one host thread,
//    one non-blocking stream per GPU; peer access enabled between all of them;
//  * NCCL is loaded with dlopen (nccl_loader.h: $SPEAR_NCCL_LIBRARY, else libnccl.so.2) with NCCL_NVLS_ENABLE=0
//    unless the environment sets it (NVLink multicast stays off on the target machine); communicators come from
//    one ncclGetUniqueId and ncclCommInitRank per GPU inside one group; without NCCL only P2P is timed;
//  * per size and method, each GPU's stream captures a CUDA graph of 100 back-to-back all-reduces (NCCL calls of
//    all GPUs in one ncclGroupStart/End per all-reduce); one warm-up replay, then 10 replays, each after a
//    cudaDeviceSynchronize of every GPU, timed with events on GPU 0 (whose graph is launched last, so the host's
//    launch skew between GPUs is not timed); µs per all-reduce = median replay time / 100: the exposed latency of
//    reductions that run back to back, as in a decode step's graph; the P2P kernel uses programmatic dependent
//    launch like the backend's other kernels (SPEAR_PDL=0 turns it off for an A/B run);
//  * P2P is timed twice: as the backend calls it (the LL protocol up to kP2pLlMaxBlocks · kP2pLlSliceBytes =
//    256 KB, the flag protocol above) and with LL off (the flag protocol at every size), for the A/B;
//  * algorithm bandwidth = message bytes / time;
//  * correctness, once per size before timing: random inputs; the P2P output of every rank must equal the CPU
//    reference (rank-order fp32 sum, one bf16 rounding) bit for bit; NCCL's output must equal it bit for bit when
//    R = 2 (a sum of two values rounded once) and be within R bf16 roundings of it otherwise (NCCL's order differs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nccl_loader.h"
#include "backend/cuda/p2p_reduce.h"
#include "bench_util.h"
#include "core/dtype.h"
#include "core/error.h"

using namespace spear;

namespace {

using bench::shell;
using bf16 = __nv_bfloat16;

constexpr int kMaxBenchRanks = 4;
constexpr int kCallsPerGraph = 100;
constexpr int kReplays = 10;
constexpr int64_t kSizesKb[] = {8, 16, 32, 64, 128, 256, 512, 1024};
constexpr int64_t kCapacity = 1024 * 1024 / 2;  // elements of the largest message
// A P2P kernel whose peer never arrives traps after this long instead of hanging the run.
constexpr uint64_t kTimeoutNs = 20'000'000'000ull;

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  bf16* x = nullptr;     // P2P input [kCapacity]
  bf16* out = nullptr;   // P2P output [kCapacity]
  bf16* nbuf = nullptr;  // NCCL's in-place buffer [kCapacity]
  ncclComm_t comm = nullptr;
  cuda::P2pPeers peers;
  cuda::P2pPeers flag_peers;  // the same buffers with the LL protocol off
};

void set_device(int d) { SPEAR_CUDA_CHECK(cudaSetDevice(d)); }

// Waits for all work on every GPU (host-side; only once every rank's launches are queued: a rank's all-reduce
// spins until its peers' run, so waiting between two ranks' launches would dead-lock).
void sync_all(const std::vector<Rank>& ranks) {
  for (const Rank& r : ranks) {
    set_device(r.device);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// µs per all-reduce of `enqueue` (queues one all-reduce on every rank's stream): a CUDA graph of kCallsPerGraph
// calls per GPU, one warm-up replay, median of kReplays timed replays / kCallsPerGraph.
template <typename F>
double time_graph_us(const std::vector<Rank>& ranks, cudaEvent_t e0, cudaEvent_t e1, F&& enqueue) {
  const size_t nr = ranks.size();
  std::vector<cudaGraph_t> graphs(nr, nullptr);
  std::vector<cudaGraphExec_t> execs(nr, nullptr);
  auto cleanup = [&] {
    for (size_t r = 0; r < nr; ++r) {
      cudaSetDevice(ranks[r].device);
      cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(ranks[r].stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
        cudaGraph_t g = nullptr;
        cudaStreamEndCapture(ranks[r].stream, &g);
        if (g) cudaGraphDestroy(g);
      }
      if (execs[r]) cudaGraphExecDestroy(execs[r]);
      if (graphs[r]) cudaGraphDestroy(graphs[r]);
    }
    cudaGetLastError();
  };
  try {
    // ThreadLocal capture: one thread captures every GPU's stream at once (as nccl-tests -g N -G does).
    for (const Rank& r : ranks) {
      set_device(r.device);
      SPEAR_CUDA_CHECK(cudaStreamBeginCapture(r.stream, cudaStreamCaptureModeThreadLocal));
    }
    for (int i = 0; i < kCallsPerGraph; ++i) enqueue();
    // The current device must be the stream's at capture end, instantiation and launch (NCCL switches devices
    // inside ncclGroupEnd; a graph instantiated on another device takes a slow fallback path).
    // Every capture ends before any instantiation: a thread-local capture still open on another stream forbids it.
    for (size_t r = 0; r < nr; ++r) {
      set_device(ranks[r].device);
      SPEAR_CUDA_CHECK(cudaStreamEndCapture(ranks[r].stream, &graphs[r]));
    }
    for (size_t r = 0; r < nr; ++r) {
      set_device(ranks[r].device);
      SPEAR_CUDA_CHECK(cudaGraphInstantiate(&execs[r], graphs[r], 0));
    }
    // Peers first, GPU 0 last: its events then time the all-reduces, not the host's launch skew between GPUs.
    auto replay = [&](bool timed) {
      for (size_t k = nr; k-- > 0;) {
        set_device(ranks[k].device);
        if (k == 0 && timed) SPEAR_CUDA_CHECK(cudaEventRecord(e0, ranks[0].stream));
        SPEAR_CUDA_CHECK(cudaGraphLaunch(execs[k], ranks[k].stream));
        if (k == 0 && timed) SPEAR_CUDA_CHECK(cudaEventRecord(e1, ranks[0].stream));
      }
    };
    sync_all(ranks);
    replay(false);
    sync_all(ranks);
    std::vector<double> per_call;
    for (int rep = 0; rep < kReplays; ++rep) {
      sync_all(ranks);
      replay(true);
      sync_all(ranks);
      float ms = 0;
      SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      per_call.push_back(double(ms) * 1e3 / kCallsPerGraph);
    }
    cleanup();
    return median(per_call);
  } catch (...) {
    cleanup();
    throw;
  }
}

// Fallback when NCCL cannot be captured in a graph: kCallsPerGraph calls queued eagerly between GPU 0's events
// (includes NCCL's host-side launch cost whenever that exceeds the GPU time).
template <typename F>
double time_eager_us(const std::vector<Rank>& ranks, cudaEvent_t e0, cudaEvent_t e1, F&& enqueue) {
  sync_all(ranks);
  for (int i = 0; i < 10; ++i) enqueue();
  sync_all(ranks);
  std::vector<double> per_call;
  for (int rep = 0; rep < kReplays; ++rep) {
    sync_all(ranks);
    set_device(ranks[0].device);
    SPEAR_CUDA_CHECK(cudaEventRecord(e0, ranks[0].stream));
    for (int i = 0; i < kCallsPerGraph; ++i) enqueue();
    set_device(ranks[0].device);
    SPEAR_CUDA_CHECK(cudaEventRecord(e1, ranks[0].stream));
    sync_all(ranks);
    float ms = 0;
    SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    per_call.push_back(double(ms) * 1e3 / kCallsPerGraph);
  }
  return median(per_call);
}

std::vector<uint16_t> download(int device, const bf16* src, int64_t n) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  set_device(device);
  SPEAR_CUDA_CHECK(cudaMemcpy(v.data(), src, v.size() * 2, cudaMemcpyDeviceToHost));
  return v;
}

struct Row {
  int64_t bytes = 0, elements = 0;
  double p2p_us = 0;        // as dispatched (LL where it fits)
  double p2p_flags_us = 0;  // flag protocol only
  bool ll = false;          // the dispatched call took the LL protocol
  bool p2p_flags_exact = false;
  std::optional<double> nccl_us;
  std::string nccl_mode;  // "graph", "eager" or "" (not timed)
  bool p2p_exact = false;
  std::optional<bool> nccl_ok;
  int64_t nccl_mismatches = 0;  // elements where NCCL differs from the reference
  double nccl_max_abs_diff = 0;
  bool pass() const { return p2p_exact && p2p_flags_exact && nccl_ok.value_or(true); }
};

void usage() {
  std::printf(
      "usage: bench_allreduce [--out FILE.json] [--help]\n"
      "  P2P dual-write all-reduce (p2p_allreduce_bf16) vs NCCL all-reduce, bf16, 8 KB .. 1 MB, on the visible GPUs\n"
      "  (2..4). NCCL: $SPEAR_NCCL_LIBRARY or libnccl.so.2; NCCL_NVLS_ENABLE defaults to 0.\n"
      "  --out F    JSON output (default bench/results/allreduce.json)\n");
}

}  // namespace

int main(int argc, char** argv) try {
  std::string out_path = "bench/results/allreduce.json";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  // Before NCCL is loaded or initialised: NVLink multicast (NVLS) must stay off on the target machine.
  setenv("NCCL_NVLS_ENABLE", "0", 0);

  const int visible = cuda::device_count();
  if (visible < 2) {
    std::printf("bench_allreduce: needs at least 2 GPUs, found %d; nothing to measure\n", visible);
    return 0;
  }
  const int nranks = std::min(visible, kMaxBenchRanks);
  std::vector<int> devices(static_cast<size_t>(nranks));
  for (int r = 0; r < nranks; ++r) devices[size_t(r)] = r;
  if (!cuda::p2p_enable_peer_access(devices)) {
    std::printf("bench_allreduce: GPUs 0..%d cannot access each other's memory (no P2P); nothing to measure\n",
                nranks - 1);
    return 0;
  }
  const cuda::DeviceInfo dev = cuda::device_info(0);
  // Whether the P2P kernel is launched with programmatic dependent launch (launch_kernel's rule: sm_90+ and
  // SPEAR_PDL not 0), for A/B runs with SPEAR_PDL=0.
  const char* pdl_env = std::getenv("SPEAR_PDL");
  const bool pdl = !(pdl_env && pdl_env[0] == '0') && dev.major >= 9;

  std::vector<cuda::P2pRankBuffers> bufs;
  for (int r = 0; r < nranks; ++r) bufs.push_back(cuda::p2p_alloc_rank_buffers(r, nranks, kCapacity));
  std::vector<Rank> ranks(static_cast<size_t>(nranks));
  for (int r = 0; r < nranks; ++r) {
    Rank& k = ranks[size_t(r)];
    k.device = r;
    set_device(r);
    SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&k.stream, cudaStreamNonBlocking));
    SPEAR_CUDA_CHECK(cudaMalloc(&k.x, size_t(kCapacity) * 2));
    SPEAR_CUDA_CHECK(cudaMalloc(&k.out, size_t(kCapacity) * 2));
    SPEAR_CUDA_CHECK(cudaMalloc(&k.nbuf, size_t(kCapacity) * 2));
    k.peers = cuda::p2p_peers_in_process(bufs, r);
    k.peers.timeout_ns = kTimeoutNs;
    k.flag_peers = k.peers;
    k.flag_peers.ll_max_blocks = 0;
  }
  set_device(0);
  cudaEvent_t e0, e1;
  SPEAR_CUDA_CHECK(cudaEventCreate(&e0));
  SPEAR_CUDA_CHECK(cudaEventCreate(&e1));

  // NCCL: one communicator per GPU, created together (ncclCommInitRank of every rank inside one group).
  std::string nccl_error;
  bool have_nccl = cuda::nccl_available(&nccl_error);
  const cuda::NcclApi* api = nullptr;
  if (have_nccl) {
    try {
      api = &cuda::nccl();
      ncclUniqueId id;
      SPEAR_NCCL_CHECK(api->get_unique_id(&id));
      SPEAR_NCCL_CHECK(api->group_start());
      for (Rank& k : ranks) {
        set_device(k.device);
        SPEAR_NCCL_CHECK(api->comm_init_rank(&k.comm, nranks, id, k.device));
      }
      SPEAR_NCCL_CHECK(api->group_end());
      cudaGetLastError();  // NCCL may leave a non-sticky error (peer access already enabled) behind
    } catch (const std::exception& e) {
      have_nccl = false;
      nccl_error = e.what();
    }
  }
  std::printf("devices: %d x %s (of %d visible); P2P staging %lld elements per source, PDL %s\n", nranks,
              dev.name.c_str(), visible, static_cast<long long>(bufs[0].capacity), pdl ? "on" : "off (SPEAR_PDL=0)");
  if (have_nccl)
    std::printf("NCCL: %s, version %d, NCCL_NVLS_ENABLE=%s\n", api->path.c_str(), api->version,
                std::getenv("NCCL_NVLS_ENABLE"));
  else
    std::printf("NCCL: not available, timing P2P only (%s)\n", nccl_error.c_str());

  auto nccl_enqueue = [&](int64_t n) {
    SPEAR_NCCL_CHECK(api->group_start());
    for (Rank& k : ranks)
      SPEAR_NCCL_CHECK(api->all_reduce(k.nbuf, k.nbuf, size_t(n), ncclBfloat16, ncclSum, k.comm, k.stream));
    SPEAR_NCCL_CHECK(api->group_end());
  };
  auto p2p_enqueue = [&](int64_t n, bool flags_only) {
    for (Rank& k : ranks) {
      set_device(k.device);
      cuda::p2p_allreduce_bf16(k.x, k.out, n, flags_only ? k.flag_peers : k.peers, k.device, k.stream);
    }
  };

  std::printf("\n%8s %9s %6s %9s %9s %9s %9s %10s  %s\n", "size", "P2P us", "proto", "flags us", "NCCL us", "NCCL/P2P",
              "P2P GB/s", "NCCL GB/s", "check");
  std::vector<Row> rows;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::string nccl_mode = "graph";
  for (int64_t kb : kSizesKb) {
    Row row;
    row.bytes = kb * 1024;
    row.elements = row.bytes / 2;
    const int64_t n = row.elements;

    // Correctness: random inputs, one P2P and one NCCL all-reduce, against the CPU reference.
    std::vector<std::vector<uint16_t>> in(static_cast<size_t>(nranks));
    for (Rank& k : ranks) {
      auto& v = in[size_t(k.device)];
      v.resize(size_t(n));
      for (auto& h : v) h = f32_to_bf16(nd(rng));
      set_device(k.device);
      SPEAR_CUDA_CHECK(cudaMemcpy(k.x, v.data(), size_t(n) * 2, cudaMemcpyHostToDevice));
      SPEAR_CUDA_CHECK(cudaMemset(k.out, 0xff, size_t(n) * 2));
    }
    std::vector<const uint16_t*> xs;
    for (const auto& v : in) xs.push_back(v.data());
    std::vector<uint16_t> ref(static_cast<size_t>(n));
    cuda::p2p_allreduce_reference_bf16(xs.data(), nranks, n, ref.data());
    row.ll = cuda::p2p_allreduce_uses_ll(n, 2, ranks[0].peers);
    for (bool flags_only : {false, true}) {
      for (Rank& k : ranks) {
        set_device(k.device);
        SPEAR_CUDA_CHECK(cudaMemset(k.out, 0xff, size_t(n) * 2));
      }
      sync_all(ranks);
      p2p_enqueue(n, flags_only);
      sync_all(ranks);
      bool exact = true;
      for (const Rank& k : ranks) exact = exact && download(k.device, k.out, n) == ref;
      (flags_only ? row.p2p_flags_exact : row.p2p_exact) = exact;
    }
    if (have_nccl) {
      for (Rank& k : ranks) {
        set_device(k.device);
        SPEAR_CUDA_CHECK(cudaMemcpyAsync(k.nbuf, k.x, size_t(n) * 2, cudaMemcpyDeviceToDevice, k.stream));
      }
      try {
        nccl_enqueue(n);
        sync_all(ranks);
        bool ok = true;
        for (const Rank& k : ranks) {
          const std::vector<uint16_t> got = download(k.device, k.nbuf, n);
          for (int64_t i = 0; i < n; ++i) {
            const float g = bf16_to_f32(got[size_t(i)]), w = bf16_to_f32(ref[size_t(i)]);
            if (got[size_t(i)] == ref[size_t(i)]) continue;
            ++row.nccl_mismatches;
            const double diff = std::fabs(double(g) - double(w));
            row.nccl_max_abs_diff = std::max(row.nccl_max_abs_diff, std::isfinite(diff) ? diff : double(INFINITY));
            // R = 2: one rounding of an exact sum, must be identical. R > 2: NCCL rounds each partial sum; allow
            // R roundings (2^-8 relative each) of the magnitude sum.
            double mag = 0;
            for (const auto& v : in) mag += std::fabs(bf16_to_f32(v[size_t(i)]));
            if (nranks == 2 || !(diff <= nranks * std::ldexp(mag, -8))) ok = false;
          }
        }
        row.nccl_ok = ok;
      } catch (const std::exception& e) {
        std::printf("NCCL all-reduce failed (%s); timing P2P only from here\n", e.what());
        have_nccl = false;
        nccl_error = e.what();
      }
    }

    // Timing.
    row.p2p_us = time_graph_us(ranks, e0, e1, [&] { p2p_enqueue(n, false); });
    row.p2p_flags_us = time_graph_us(ranks, e0, e1, [&] { p2p_enqueue(n, true); });
    if (have_nccl) {
      for (Rank& k : ranks) {  // zeros stay zeros through repeated in-place sums (the time does not depend on them)
        set_device(k.device);
        SPEAR_CUDA_CHECK(cudaMemsetAsync(k.nbuf, 0, size_t(n) * 2, k.stream));
      }
      if (nccl_mode == "graph") {
        try {
          row.nccl_us = time_graph_us(ranks, e0, e1, [&] { nccl_enqueue(n); });
        } catch (const std::exception& e) {
          std::printf("NCCL in a CUDA graph failed (%s); timing NCCL eagerly from here\n", e.what());
          nccl_mode = "eager";
        }
      }
      if (nccl_mode == "eager") {
        try {
          row.nccl_us = time_eager_us(ranks, e0, e1, [&] { nccl_enqueue(n); });
        } catch (const std::exception& e) {
          std::printf("NCCL all-reduce failed (%s); timing P2P only from here\n", e.what());
          have_nccl = false;
          nccl_error = e.what();
        }
      }
      if (row.nccl_us) row.nccl_mode = nccl_mode;
    }
    rows.push_back(row);

    char size_s[32], nccl_s[32], speed_s[32], nbw_s[32];
    std::snprintf(size_s, sizeof size_s, "%lld KB", static_cast<long long>(kb));
    std::snprintf(nccl_s, sizeof nccl_s, "%s", "-");
    std::snprintf(speed_s, sizeof speed_s, "%s", "-");
    std::snprintf(nbw_s, sizeof nbw_s, "%s", "-");
    if (row.nccl_us) {
      std::snprintf(nccl_s, sizeof nccl_s, "%.2f", *row.nccl_us);
      std::snprintf(speed_s, sizeof speed_s, "%.2fx", *row.nccl_us / row.p2p_us);
      std::snprintf(nbw_s, sizeof nbw_s, "%.1f", double(row.bytes) / *row.nccl_us / 1e3);
    }
    std::printf("%8s %9.2f %6s %9.2f %9s %9s %9.1f %10s  %s (P2P %s reference, flags %s%s)\n", size_s, row.p2p_us,
                row.ll ? "LL" : "flags", row.p2p_flags_us, nccl_s, speed_s, double(row.bytes) / row.p2p_us / 1e3, nbw_s,
                row.pass() ? "PASS" : "FAIL", row.p2p_exact ? "==" : "!=", row.p2p_flags_exact ? "==" : "!=",
                !row.nccl_ok               ? ""
                : row.nccl_mismatches == 0 ? ", NCCL == reference"
                                           : (", NCCL differs in " + std::to_string(row.nccl_mismatches) +
                                              " elements, max |diff| " + std::to_string(row.nccl_max_abs_diff))
                                                 .c_str());
    std::fflush(stdout);
  }

  // Goals: P2P <= 5 us up to 64 KB, and >= 2x faster than NCCL.
  double worst_small_us = 0, min_speedup = INFINITY, min_speedup_small = INFINITY;
  bool all_pass = true;
  for (const Row& r : rows) {
    all_pass = all_pass && r.pass();
    if (r.bytes <= 64 * 1024) worst_small_us = std::max(worst_small_us, r.p2p_us);
    if (r.nccl_us) {
      min_speedup = std::min(min_speedup, *r.nccl_us / r.p2p_us);
      if (r.bytes <= 64 * 1024) min_speedup_small = std::min(min_speedup_small, *r.nccl_us / r.p2p_us);
    }
  }
  std::printf("\ngoals: P2P <= 5 us at <= 64 KB: %s (worst %.2f us); >= 2x NCCL: ",
              worst_small_us <= 5.0 ? "met" : "NOT met", worst_small_us);
  if (std::isfinite(min_speedup))
    std::printf("%s at <= 64 KB (min %.2fx), %s over 8 KB..1 MB (min %.2fx)\n",
                min_speedup_small >= 2.0 ? "met" : "NOT met", min_speedup_small, min_speedup >= 2.0 ? "met" : "NOT met",
                min_speedup);
  else
    std::printf("not measured (no NCCL)\n");
  std::printf("correctness: %s\n", all_pass ? "PASS" : "FAIL");

  nlohmann::json J;
  J["commit"] = shell("git rev-parse --short HEAD 2>/dev/null");
  J["date"] = shell("date -u +%Y-%m-%dT%H:%M:%SZ");
  J["device"] = dev.name;
  J["gpus"] = nranks;
  J["visible_gpus"] = visible;
  J["calls_per_graph"] = kCallsPerGraph;
  J["replays"] = kReplays;
  J["p2p_block_elems"] = cuda::kP2pBlockElems;
  J["p2p_ll_max_bytes"] = cuda::kP2pLlMaxBlocks * cuda::kP2pLlSliceBytes;
  J["p2p_pdl"] = pdl;
  J["nccl"] = {{"available", api != nullptr && nccl_error.empty()},
               {"library", api ? api->path : ""},
               {"version", api ? api->version : 0},
               {"error", nccl_error},
               {"nvls_enable", std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : ""}};
  J["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    nlohmann::json o = {{"size_bytes", r.bytes},
                        {"elements", r.elements},
                        {"p2p_us", r.p2p_us},
                        {"p2p_algbw_gbps", double(r.bytes) / r.p2p_us / 1e3},
                        {"p2p_exact", r.p2p_exact},
                        {"p2p_protocol", r.ll ? "ll" : "flags"},
                        {"p2p_flags_us", r.p2p_flags_us},
                        {"p2p_flags_exact", r.p2p_flags_exact},
                        {"nccl_us", nullptr},
                        {"nccl_algbw_gbps", nullptr},
                        {"speedup_nccl_over_p2p", nullptr},
                        {"nccl_timing", r.nccl_mode},
                        {"nccl_check", nullptr},
                        {"nccl_mismatches", r.nccl_mismatches},
                        {"nccl_max_abs_diff", r.nccl_max_abs_diff},
                        {"check", r.pass() ? "PASS" : "FAIL"}};
    if (r.nccl_us) {
      o["nccl_us"] = *r.nccl_us;
      o["nccl_algbw_gbps"] = double(r.bytes) / *r.nccl_us / 1e3;
      o["speedup_nccl_over_p2p"] = *r.nccl_us / r.p2p_us;
    }
    if (r.nccl_ok) o["nccl_check"] = *r.nccl_ok;
    J["rows"].push_back(o);
  }
  J["goals"] = {{"p2p_worst_us_le_64kb", worst_small_us},
                {"p2p_le_5us_le_64kb", worst_small_us <= 5.0},
                {"min_speedup_le_64kb", std::isfinite(min_speedup_small) ? nlohmann::json(min_speedup_small) : nullptr},
                {"min_speedup_all", std::isfinite(min_speedup) ? nlohmann::json(min_speedup) : nullptr}};
  J["correctness"] = all_pass ? "PASS" : "FAIL";
  const std::filesystem::path out_file(out_path);
  if (out_file.has_parent_path()) std::filesystem::create_directories(out_file.parent_path());
  std::ofstream(out_path) << J.dump(2) << "\n";
  std::printf("wrote %s\n", out_path.c_str());
  std::fflush(nullptr);

  const int rc = all_pass ? 0 : 1;
  if (api != nullptr) {
    // The NCCL communicators are not destroyed: ncclCommDestroy of one of several ranks driven by one thread
    // depends on the others' destroy, and NCCL's helper threads may still hold the devices during static
    // teardown. Results are written; leave without running destructors and let the OS release the GPUs.
    std::_Exit(rc);
  }
  for (auto& b : bufs) cuda::p2p_free_rank_buffers(b);
  return rc;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_allreduce: %s\n", e.what());
  std::fflush(nullptr);
  std::_Exit(1);  // NCCL communicators may be live (see above)
}
