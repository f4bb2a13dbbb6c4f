// Kernel playground (llm.c dev/cuda style, not part of the build): the read ceilings that issue 5's goals are
// measured against. No arithmetic at all, only the weight bytes, so whatever a W4 kernel does it cannot beat
// these numbers on this GPU:
//
//   1. the device's copy bandwidth (cudaMemcpy D2D of 1 GiB, read + write counted, as bench_w4_gemm counts it)
//      and its read bandwidth (1 GiB read by the best read kernel below);
//   2. per matrix size of the 8B shapes (k/v 2 MB, q/o 8 MB, gate/up/down 29 MB, gate+up grouped 59 MB): the
//      fastest pure read among several kernels (16-byte loads with 1-8 in flight per thread and 1-8 CTAs per SM;
//      a one-thread cp.async.bulk ring of 2-8 chunks of 8-32 KB per CTA), as % of copy bandwidth, timed
//        alone  one launch, L2 holding other data (each launch reads another copy), events around it
//        b2b    100 launches back to back on one stream (each another copy)
//        pdl    the same with programmatic dependent launch, each kernel triggering its dependents at its start
//               (the W4 kernels' weight stream starts before the previous kernel ends)
//   3. a roofline of one W4 decode step of the Llama-3.2-1B shape at batch 1: a CUDA graph of the step's launches
//      in order (per layer: norm, q/k/v 3.1 MB, attention, o 2.1 MB, norm, gate/up 16.8 MB, down 8.4 MB; then
//      the final norm, the bf16 lm_head 525 MB and the argmax), each W4 launch replaced by the best pure read of
//      its bytes and every small kernel by a one-CTA kernel that waits for its predecessor (PDL on all).
//      Issue 5's goal 3 asks 0.40 ms of that step.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Isrc dev/cuda/roofline_lab.cu -o /tmp/roofline && /tmp/roofline
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "backend/cuda/w4a16_common.cuh"

#include "common.h"

using namespace spear::cuda::w4_detail;

__device__ __forceinline__ void grid_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void grid_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Grid-stride 16-byte loads, U independent loads in flight per thread.
template <int U>
__global__ void __launch_bounds__(256) read_ldg(const uint4* p, size_t n16, unsigned* out) {
  grid_trigger();
  const uint64_t pol = evict_first_policy();
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + (U - 1) * stride < n16; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = ld_weights(p + i + u * stride, pol);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = ld_weights(p + i, pol);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  grid_wait();
  if (acc == 0x9E3779B9u) out[0] = acc;
}

// One CTA streams its contiguous share through a ring of S chunks of C bytes: one thread issues cp.async.bulk
// copies completing on an mbarrier per slot, waits for the oldest and reissues that slot.
__global__ void __launch_bounds__(32) read_bulk(const char* p, size_t bytes, int S, int C, unsigned* out) {
  extern __shared__ __align__(128) char ring[];
  __shared__ uint64_t full[8];
  grid_trigger();
  if (threadIdx.x != 0) return;
  const uint64_t pol = evict_first_policy();
  const size_t per = (bytes / gridDim.x + C - 1) / C * C;
  const size_t b0 = min(bytes, blockIdx.x * per), b1 = min(bytes, b0 + per);
  const int n = int((b1 - b0 + C - 1) / C);
  for (int s = 0; s < S; ++s) mbar_init(&full[s], 1);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue = [&](int c) {
    const int s = c % S;
    const size_t off = b0 + size_t(c) * C;
    const unsigned len = unsigned(min(size_t(C), b1 - off));
    mbar_expect_tx(&full[s], len);
    bulk_copy_to_shared(ring + size_t(s) * C, p + off, len, &full[s], pol);
  };
  for (int c = 0; c < min(S, n); ++c) issue(c);
  uint32_t acc = 0;
  for (int c = 0; c < n; ++c) {
    const int s = c % S;
    mbar_wait(&full[s], unsigned(c / S) & 1);
    acc ^= reinterpret_cast<const uint32_t*>(ring + size_t(s) * C)[0];
    if (c + S < n) issue(c + S);
  }
  grid_wait();
  if (acc == 0x9E3779B9u) out[0] = acc;
}

// read_bulk with the W4 kernels' handshake: 8 consumer warps wait for each chunk and release it on an empty
// mbarrier, which the producer waits for before reusing the slot.
__global__ void __launch_bounds__(288) read_bulk_hs(const char* p, size_t bytes, int S, int C, unsigned* out) {
  extern __shared__ __align__(128) char ring[];
  __shared__ uint64_t full[16], empty[16];
  const size_t per = (bytes / gridDim.x + C - 1) / C * C;
  const size_t b0 = min(bytes, blockIdx.x * per), b1 = min(bytes, b0 + per);
  const int n = int((b1 - b0 + C - 1) / C);
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  grid_trigger();
  const int warp = threadIdx.x >> 5;
  if (warp == 8) {
    if ((threadIdx.x & 31) == 0) {
      const uint64_t pol = evict_first_policy();
      for (int c = 0; c < n; ++c) {
        const int s = c % S;
        if (c >= S) mbar_wait(&empty[s], unsigned((c / S) - 1) & 1u);
        const size_t off = b0 + size_t(c) * C;
        const unsigned len = unsigned(min(size_t(C), b1 - off));
        mbar_expect_tx(&full[s], len);
        bulk_copy_to_shared(ring + size_t(s) * C, p + off, len, &full[s], pol);
      }
    }
    return;
  }
  uint32_t acc = 0;
  for (int c = 0; c < n; ++c) {
    const int s = c % S;
    mbar_wait(&full[s], unsigned(c / S) & 1u);
    acc ^= reinterpret_cast<const uint32_t*>(ring + size_t(s) * C)[threadIdx.x];
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&empty[s]);
  }
  grid_wait();
  if (acc == 0x9E3779B9u) out[0] = acc;
}

// A small kernel of the step (norm, attention, argmax): waits for its predecessor, writes one word.
__global__ void tiny(unsigned* out, int i) {
  grid_wait();
  if (threadIdx.x == 0) out[1 + (i & 1023)] = i;
}

struct Reader {
  std::string name;
  std::function<void(cudaStream_t, const char*, size_t, bool)> launch;
};

template <typename K, typename... A>
static void launch_ex(cudaStream_t st, bool pdl, dim3 grid, dim3 block, size_t smem, K kernel, A... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (pdl) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  CK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

static unsigned* g_out = nullptr;
static int g_sms = 0;

static std::vector<Reader> make_readers() {
  std::vector<Reader> r;
  for (int blocks : {2, 4, 8})
    for (int u : {1, 4, 8}) {
      auto k = u == 1 ? read_ldg<1> : u == 4 ? read_ldg<4> : read_ldg<8>;
      r.push_back({"ldg " + std::to_string(blocks) + "/SM x" + std::to_string(u),
                   [=](cudaStream_t st, const char* p, size_t bytes, bool pdl) {
                     launch_ex(st, pdl, dim3(blocks * g_sms), dim3(256), 0, k, reinterpret_cast<const uint4*>(p),
                               bytes / 16, g_out);
                   }});
    }
  // The bulk-copy readers: one producer thread (read_bulk, 32 threads) or a producer warp beside 8 idle consumer warps
  // (read_bulk_hs, the decode kernel's shape), CTAs per SM x stages x bytes per stage.
  using Ints = std::initializer_list<int>;
  auto add_bulk = [&](const char* name, decltype(&read_bulk) kernel, int threads, Ints ctas_per_sm, Ints stages,
                      Ints stage_bytes) {
    for (int ctas : ctas_per_sm)
      for (int S : stages)
        for (int C : stage_bytes) {
          if (size_t(S) * C * ctas > 200 * 1024) continue;
          r.push_back({std::string(name) + " " + std::to_string(ctas) + "/SM " + std::to_string(S) + "x" +
                           std::to_string(C / 1024) + "K",
                       [=](cudaStream_t st, const char* p, size_t bytes, bool pdl) {
                         launch_ex(st, pdl, dim3(ctas * g_sms), dim3(threads), size_t(S) * C, kernel, p, bytes, S, C,
                                   g_out);
                       }});
        }
  };
  add_bulk("bulk", read_bulk, 32, {1, 2, 4}, {4, 8}, {8192, 16384, 32768});
  add_bulk("bulk+hs", read_bulk_hs, 288, {1, 2}, {8, 12}, {8192, 16384});
  return r;
}

// body(i) for i < warmup untimed, then for i < n each between its own pair of events: the n times in ms, sorted.
template <typename Body>
static std::vector<float> event_ms(cudaStream_t st, int warmup, int n, Body&& body) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < warmup; ++i) body(i);
  std::vector<float> v;
  for (int i = 0; i < n; ++i) {
    CK(cudaEventRecord(e0, st));
    body(i);
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    v.push_back(ms);
  }
  CK(cudaGetLastError());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(v.begin(), v.end());
  return v;
}

struct Buffers {
  char* base = nullptr;
  size_t bytes = 0;
  int copies = 0;
  const char* copy(int i) const { return base + size_t(i % copies) * bytes; }
};

// Times one reader on `bytes`: alone (one launch between events, each call another copy), b2b and pdl (100
// launches). Returns µs per launch for the three modes.
static void time_reader(const Reader& rd, const Buffers& b, cudaStream_t st, double (&us)[3]) {
  const std::vector<float> alone =
      event_ms(st, b.copies, 30, [&](int i) { rd.launch(st, b.copy(i), b.bytes, false); });
  us[0] = 1e3 * alone[alone.size() / 2];
  for (int pdl = 0; pdl < 2; ++pdl) {
    const int reps = 100;
    for (int i = 0; i < b.copies; ++i) rd.launch(st, b.copy(i), b.bytes, pdl);
    const std::vector<float> all = event_ms(st, 0, 1, [&](int) {
      for (int i = 0; i < reps; ++i) rd.launch(st, b.copy(i), b.bytes, pdl);
    });
    us[1 + pdl] = 1e3 * all[0] / reps;
  }
}

int main() {
  CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  CK(cudaFuncSetAttribute(read_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CK(cudaFuncSetAttribute(read_bulk_hs, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CK(cudaMalloc(&g_out, 4096 * sizeof(unsigned)));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const size_t big = size_t(1) << 30;
  char *src, *dst;
  CK(cudaMalloc(&src, big));
  CK(cudaMalloc(&dst, big));
  CK(cudaMemset(src, 0x5a, big));
  const float best_ms =
      event_ms(st, 1, 5, [&](int) { CK(cudaMemcpyAsync(dst, src, big, cudaMemcpyDeviceToDevice, st)); })[0];
  const double copy_gbps = 2.0 * big / (best_ms * 1e-3) / 1e9;
  CK(cudaFree(dst));
  const auto readers = make_readers();
  double read_best = 0;
  std::string read_name;
  for (const auto& rd : readers) {
    const float best = event_ms(st, 1, 3, [&](int) { rd.launch(st, src, big, false); })[0];
    const double gbps = big / (best * 1e-3) / 1e9;
    if (gbps > read_best) read_best = gbps, read_name = rd.name;
  }
  CK(cudaFree(src));
  std::printf("%d SMs, L2 %d MB\ncopy bandwidth (cudaMemcpy D2D 1 GiB, read + write): %.0f GB/s\n", g_sms, l2 >> 20,
              copy_gbps);
  std::printf("read bandwidth (1 GiB, best kernel: %s): %.0f GB/s = %.1f%% of copy\n\n", read_name.c_str(), read_best,
              100 * read_best / copy_gbps);

  // 2. The 8B shapes' W4 bytes (int4 codes + per-channel scales and zero points).
  struct Shape {
    const char* name;
    size_t n, k;
  };
  const Shape shapes[] = {{"8b k/v", 1024, 4096}, {"8b q/o", 4096, 4096}, {"8b gate/up", 14336, 4096},
                          {"8b down", 4096, 14336}, {"8b gate+up", 28672, 4096}};
  std::printf("%-11s %8s | %-18s %8s %6s | %-18s %8s %6s | %-18s %8s %6s\n", "matrix", "MB", "best alone", "us",
              "%copy", "best b2b", "us", "%copy", "best pdl", "us", "%copy");
  for (const auto& s : shapes) {
    Buffers b;
    b.bytes = (s.n * s.k / 2 + s.n * 6 + 255) / 256 * 256;
    b.copies = int(4 * size_t(l2) / b.bytes) + 2;
    CK(cudaMalloc(&b.base, b.bytes * b.copies));
    CK(cudaMemset(b.base, 0x5a, b.bytes * b.copies));
    double best[3] = {1e9, 1e9, 1e9};
    std::string who[3];
    auto pct = [&](double us) { return 100.0 * b.bytes / (us * 1e-6) / 1e9 / copy_gbps; };
    for (const auto& rd : readers) {
      double us[3];
      time_reader(rd, b, st, us);
      for (int m = 0; m < 3; ++m)
        if (us[m] < best[m]) best[m] = us[m], who[m] = rd.name;
      if (std::getenv("ROOFLINE_ALL"))
        std::printf("  %-11s %-22s alone %7.2f us %5.1f%%  b2b %7.2f us %5.1f%%  pdl %7.2f us %5.1f%%\n", s.name,
                    rd.name.c_str(), us[0], pct(us[0]), us[1], pct(us[1]), us[2], pct(us[2]));
    }
    std::printf("%-11s %8.1f | %-18s %8.2f %5.1f%% | %-18s %8.2f %5.1f%% | %-18s %8.2f %5.1f%%\n", s.name,
                b.bytes / 1e6, who[0].c_str(), best[0], pct(best[0]), who[1].c_str(), best[1], pct(best[1]),
                who[2].c_str(), best[2], pct(best[2]));
    std::fflush(stdout);
    CK(cudaFree(b.base));
  }

  // 3. Roofline of a 1B W4 decode step at batch 1 (group 128: 0.5 B per weight + 4 B per 128 weights).
  const int layers = 16;
  auto w4 = [](size_t n, size_t k) { return (n * k / 2 + n * k / 128 * 4 + 255) / 256 * 256; };
  const size_t per_layer[4] = {w4(3072, 2048), w4(2048, 2048), w4(16384, 2048), w4(2048, 8192)};
  const size_t lm_head = size_t(128256) * 2048 * 2;
  size_t total = lm_head;
  for (size_t x : per_layer) total += layers * x;
  char* wts;
  CK(cudaMalloc(&wts, total));
  CK(cudaMemset(wts, 0x5a, total));
  std::printf("\n1B W4 decode step roofline: %d launches, %.3f GB of weights (W4 %.3f GB + bf16 lm_head %.3f GB)\n",
              layers * 7 + 3, total / 1e9, (total - lm_head) / 1e9, lm_head / 1e9);
  std::printf("  at the copy bandwidth %.3f ms, at the read bandwidth %.3f ms\n", total / copy_gbps / 1e6,
              total / read_best / 1e6);
  std::printf("%-22s %10s %10s\n", "reader for every GEMM", "step ms", "GB/s");
  for (const auto& rd : readers) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    size_t off = 0;
    int t = 0;
    for (int l = 0; l < layers; ++l) {
      for (int j = 0; j < 4; ++j) {
        // before q/k/v a norm, before o the attention, before gate/up a norm; down follows gate/up directly
        if (j != 3) launch_ex(st, true, dim3(1), dim3(128), 0, tiny, g_out, t++);
        rd.launch(st, wts + off, per_layer[j], true);
        off += per_layer[j];
      }
    }
    launch_ex(st, true, dim3(1), dim3(128), 0, tiny, g_out, t++);
    rd.launch(st, wts + off, lm_head, true);
    launch_ex(st, true, dim3(1), dim3(128), 0, tiny, g_out, t++);
    CK(cudaStreamEndCapture(st, &g));
    cudaGraphExec_t ex;
    CK(cudaGraphInstantiate(&ex, g, 0));
    const std::vector<float> v = event_ms(st, 3, 15, [&](int) { CK(cudaGraphLaunch(ex, st)); });
    std::printf("%-22s %10.3f %10.0f\n", rd.name.c_str(), v[v.size() / 2], total / (v[v.size() / 2] * 1e-3) / 1e9);
    std::fflush(stdout);
    CK(cudaGraphExecDestroy(ex));
    CK(cudaGraphDestroy(g));
  }
  return 0;
}
