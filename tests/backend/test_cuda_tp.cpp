// Tensor parallelism on the CUDA backend: all-reduce of bf16 and fp32 tensors in one call, eager and inside
// replayed CUDA graphs, on two GPUs (one thread and one backend per rank, bootstrapped over a TCP ProcessGroup),
// by the P2P kernel (the default where the GPUs reach each other; the ranks share this process, so their buffers
// are mapped by peer access), by NCCL beyond the P2P capacity, and by NCCL alone; the compensated linear split
// around the all-reduce (linear_ec_partial, then ec_expand) bit-identical to linear() on one GPU; and a
// row-parallel compensated linear over two ranks against the whole linear. The two-GPU tests skip without two
// devices or without NCCL, the P2P ones also without peer access between GPUs 0 and 1.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nccl_loader.h"
#include "core/dtype.h"
#include "parallel/process_group.h"
#include "quant/quantizer.h"
#include "spear/compensator.h"
#include "test_util.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

#define SPEAR_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

#define SPEAR_REQUIRE_TWO_GPUS_AND_NCCL()                                                                 \
  do {                                                                                                    \
    if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 CUDA devices, found " << cuda::device_count(); \
    std::string why_;                                                                                     \
    if (!cuda::nccl_available(&why_)) GTEST_SKIP() << why_;                                               \
  } while (0)

#define SPEAR_REQUIRE_PEER_ACCESS()                                                           \
  do {                                                                                        \
    int can01_ = 0, can10_ = 0;                                                               \
    SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&can01_, 0, 1));                                 \
    SPEAR_CUDA_CHECK(cudaDeviceCanAccessPeer(&can10_, 1, 0));                                 \
    if (!can01_ || !can10_) GTEST_SKIP() << "GPUs 0 and 1 cannot access each other's memory"; \
  } while (0)

// Sets an environment variable for the scope (the backends read theirs when constructed) and restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_.c_str(), old_->c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// Runs fn(rank, backend) on GPUs 0 and 1, one thread each, once both backends belong to one two-rank group
// (reducing by `reduce` when given, else by the backend's default: SPEAR_TP_REDUCE or auto). Failures inside a
// rank (spear::Error, CUDA, NCCL) are reported as test failures naming the rank.
void run_two_ranks(const std::function<void(int, cuda::CudaBackend&)>& fn,
                   std::optional<TpReduce> reduce = std::nullopt) {
  // NVLink SHARP (multicast) buys nothing for two ranks, and its setup can take a shared host's GPUs out of
  // service; the environment may still turn it on.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  // A P2P kernel whose peer never comes (a bug) traps after a minute instead of hanging the test binary.
  setenv("SPEAR_TP_P2P_TIMEOUT_MS", "60000", 0);
  std::promise<int> port;
  std::future<int> port_future = port.get_future();
  std::string errors[2];
  auto rank_main = [&](int r) {
    bool port_sent = false;
    try {
      cuda::CudaBackend be(r);
      std::shared_ptr<ProcessGroup> pg;
      if (r == 0) {
        pg = ProcessGroup::listen(2, 0);
        port.set_value(pg->port());
        port_sent = true;
        pg->accept_peers(10);
      } else {
        pg = ProcessGroup::connect(1, 2, "127.0.0.1", port_future.get(), 10);
      }
      if (reduce) be.set_tp_reduce(*reduce);
      be.set_process_group(pg);
      EXPECT_EQ(be.tp_rank(), r);
      EXPECT_EQ(be.tp_size(), 2);
      fn(r, be);
    } catch (const std::exception& e) {
      if (r == 0 && !port_sent) port.set_exception(std::current_exception());  // rank 1 stops waiting
      errors[r] = e.what();
    }
  };
  std::thread t0(rank_main, 0), t1(rank_main, 1);
  t0.join();
  t1.join();
  for (int r = 0; r < 2; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

// Small integers, different per rank and per round: bf16 holds them and their sums exactly.
std::vector<float> pattern(size_t n, int rank, int round) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = float(int((i * 7 + size_t(round) * 13) % 23) - 11 + rank * (round + 2));
  return v;
}

std::vector<float> pattern_sum(size_t n, int round) {
  std::vector<float> a = pattern(n, 0, round), b = pattern(n, 1, round);
  for (size_t i = 0; i < n; ++i) a[i] += b[i];
  return a;
}

// Overwrites t (bf16 or fp32) in stream order, so that a graph replayed afterwards on the stream reads it.
void write(cuda::CudaBackend& be, const Tensor& t, const std::vector<float>& host) {
  ASSERT_EQ(size_t(t.numel()), host.size());
  if (t.dtype == DType::BF16) {
    std::vector<uint16_t> h(host.size());
    for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(host[i]);
    SPEAR_CUDA_CHECK(cudaMemcpyAsync(t.data, h.data(), h.size() * 2, cudaMemcpyHostToDevice, be.stream()));
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(be.stream()));  // h goes out of scope
  } else {
    ASSERT_EQ(t.dtype, DType::F32);
    SPEAR_CUDA_CHECK(cudaMemcpyAsync(t.data, host.data(), host.size() * 4, cudaMemcpyHostToDevice, be.stream()));
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(be.stream()));
  }
}

std::vector<float> read(cuda::CudaBackend& be, const Tensor& t) {
  std::vector<float> h(size_t(t.numel()));
  be.download(t, h.data());
  return h;
}

// Exact comparison, reporting the first mismatch only.
void expect_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", expected " << want[i];
      return;
    }
}

LinearWeights random_dense(int out, int in, bool bias, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  LinearWeights w;
  w.name = "test";
  w.out_features = out;
  w.in_features = in;
  w.w.resize(size_t(out) * in);
  for (float& v : w.w) v = 0.02f * nd(rng);
  if (bias) {
    w.bias.resize(size_t(out));
    for (float& v : w.bias) v = 0.1f * nd(rng);
  }
  return w;
}

std::vector<float> random_x(int m, int k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(size_t(m) * k);
  for (float& v : x) v = nd(rng);
  return x;
}

// Columns [c0, c0 + n) of a row-major [rows, cols] matrix.
std::vector<float> columns(const std::vector<float>& a, int rows, int cols, int c0, int n) {
  std::vector<float> out(size_t(rows) * n);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) out[size_t(r) * n + c] = a[size_t(r) * cols + c0 + c];
  return out;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace

TEST(CudaTp, AllReduceSumsBf16AndFp32) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  run_two_ranks([](int r, cuda::CudaBackend& be) {
    Tensor a = be.alloc(3, 1000), b = be.alloc_f32(3, 17);
    write(be, a, pattern(3 * 1000, r, 0));
    write(be, b, pattern(3 * 17, r, 1));
    Tensor* ts[] = {&a, &b};
    be.all_reduce_sum(ts);
    expect_equal(read(be, a), pattern_sum(3 * 1000, 0), "bf16 [3, 1000] rank " + std::to_string(r));
    expect_equal(read(be, b), pattern_sum(3 * 17, 1), "fp32 [3, 17] rank " + std::to_string(r));
  });
}

// The one-token batch on a tiny KV cache that run_graph needs (it keys graphs by the cache of begin_batch). Kept
// on the heap: the backend remembers the batch description by address.
struct TinyBatch {
  std::unique_ptr<KvCache> cache;
  BatchDesc d;
  explicit TinyBatch(cuda::CudaBackend& be) : cache(be.make_kv_cache(1, 1, 16, 8)) {
    d.tokens = {0};
    d.positions = {0};
    d.token_seq = {0};
    d.last_rows = {0};
    d.seqs = {SeqSlice{0, 1, 0, 0}};
    be.begin_batch(d, *cache);
  }
};

// The vocab-parallel lm_head's logits: each rank's columns side by side, for one row (NCCL straight into place)
// and several (gathered, then copied into columns), eagerly and inside a replayed graph.
TEST(CudaTp, AllGatherColumnsPlacesEachRanksPart) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  run_two_ranks([](int r, cuda::CudaBackend& be) {
    auto batch = std::make_unique<TinyBatch>(be);
    for (int rows : {1, 3}) {
      const int cols = 1001;
      Tensor part = be.alloc_f32(rows, cols), full = be.alloc_f32(rows, 2 * cols);
      std::vector<float> mine(size_t(rows) * cols), want(size_t(rows) * 2 * cols);
      for (int q = 0; q < 2; ++q)
        for (int i = 0; i < rows; ++i)
          for (int c = 0; c < cols; ++c) {
            const float v = float(q * 100000 + i * 2000 + c);
            want[size_t(i) * 2 * cols + size_t(q) * cols + c] = v;
            if (q == r) mine[size_t(i) * cols + c] = v;
          }
      write(be, part, mine);
      be.all_gather_cols(part, full);
      expect_equal(read(be, full), want, "eager, rows " + std::to_string(rows));
      for (int run = 0; run < 3; ++run) {  // eager first run, capture, replay
        Tensor out = be.run_graph(900 + uint64_t(rows), [&] {
          Tensor f = be.alloc_f32(rows, 2 * cols);
          be.all_gather_cols(part, f);
          return f;
        });
        expect_equal(read(be, out), want, "graph run " + std::to_string(run) + ", rows " + std::to_string(rows));
      }
    }
  });
}

TEST(CudaTp, AllReduceInsideReplayedGraph) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  run_two_ranks([](int r, cuda::CudaBackend& be) {
    auto batch = std::make_unique<TinyBatch>(be);
    Tensor a = be.alloc(3, 1000), b = be.alloc_f32(3, 17);
    // Run 0 is eager, run 1 captures and launches the graph, run 2 replays it: new contents each time.
    for (int run = 0; run < 3; ++run) {
      write(be, a, pattern(3 * 1000, r, 2 * run));
      write(be, b, pattern(3 * 17, r, 2 * run + 1));
      Tensor out = be.run_graph(7, [&] {
        Tensor* ts[] = {&a, &b};
        be.all_reduce_sum(ts);
        return a;
      });
      EXPECT_EQ(out.data, a.data);
      const std::string what = " rank " + std::to_string(r) + " run " + std::to_string(run);
      expect_equal(read(be, a), pattern_sum(3 * 1000, 2 * run), "bf16" + what);
      expect_equal(read(be, b), pattern_sum(3 * 17, 2 * run + 1), "fp32" + what);
    }
  });
}

// A tensor to reduce: bf16 from alloc, or fp32 from alloc_f32.
struct Spec {
  int64_t rows, cols;
  bool f32;
};

// Reduces tensors of these shapes in one all_reduce_sum call, `runs` times with new contents each time; through
// run_graph when `graph` (run 0 eager, run 1 captures and launches, later runs replay), else eagerly. Every sum
// must be exact (small integers). p2p[i]: whether tensor i must take the P2P kernel.
void reduce_and_check(int r, cuda::CudaBackend& be, const std::vector<Spec>& specs, const std::vector<bool>& p2p,
                      int runs, bool graph, const std::string& what) {
  ASSERT_EQ(specs.size(), p2p.size());
  std::unique_ptr<TinyBatch> batch = graph ? std::make_unique<TinyBatch>(be) : nullptr;
  std::vector<Tensor> ts;
  for (const Spec& s : specs) ts.push_back(s.f32 ? be.alloc_f32(s.rows, s.cols) : be.alloc(s.rows, s.cols));
  for (size_t i = 0; i < ts.size(); ++i)
    EXPECT_EQ(be.all_reduce_uses_p2p(ts[i]), p2p[i])
        << what << ": tensor " << i << " [" << ts[i].rows << ", " << ts[i].cols << "] " << dtype_name(ts[i].dtype);
  std::vector<Tensor*> ptrs;
  for (Tensor& t : ts) ptrs.push_back(&t);
  for (int run = 0; run < runs; ++run) {
    const int round0 = run * int(ts.size());
    for (size_t i = 0; i < ts.size(); ++i) write(be, ts[i], pattern(size_t(ts[i].numel()), r, round0 + int(i)));
    auto body = [&] {
      be.all_reduce_sum(ptrs);
      return ts[0];
    };
    if (graph) {
      Tensor out = be.run_graph(11, body);
      EXPECT_EQ(out.data, ts[0].data);
    } else {
      body();
    }
    for (size_t i = 0; i < ts.size(); ++i)
      expect_equal(
          read(be, ts[i]), pattern_sum(size_t(ts[i].numel()), round0 + int(i)),
          what + ": tensor " + std::to_string(i) + ", rank " + std::to_string(r) + ", run " + std::to_string(run));
  }
}

// The P2P kernel, required: bf16 tensors of one and of several CTAs' slices, fp32 ones (the compensators' partial
// A·x) of one and of several, alone and in one call, eagerly and in a replayed graph, with new contents each time.
TEST(CudaTp, P2pAllReduceIsExactEagerAndInGraphs) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  SPEAR_REQUIRE_PEER_ACCESS();
  run_two_ranks(
      [](int r, cuda::CudaBackend& be) {
        EXPECT_EQ(be.tp_reduce_description(), "p2p (≤ 1048576 elements) + nccl");
        reduce_and_check(r, be, {{3, 1000, false}}, {true}, 3, false, "bf16 [3, 1000]");
        reduce_and_check(r, be, {{1, 4096, false}}, {true}, 3, false, "bf16 [1, 4096]");
        reduce_and_check(r, be, {{5, 3000, true}}, {true}, 2, false, "fp32 [5, 3000]");
        const std::vector<Spec> mixed = {{3, 1000, false}, {3, 17, true}, {1, 4096, false}, {5, 3000, true}};
        reduce_and_check(r, be, mixed, {true, true, true, true}, 3, false, "mixed, eager");
        reduce_and_check(r, be, mixed, {true, true, true, true}, 4, true, "mixed, graph");
        // Eager calls after the graph's replays: the epochs the graph advanced are the ones eager calls read.
        reduce_and_check(r, be, {{2, 9000, false}, {3, 17, true}}, {true, true}, 2, false, "after the graph");
      },
      TpReduce::P2p);
}

// Beyond the staging capacity (8192 bf16 elements here, 4096 fp32 ones) a tensor goes to NCCL, in the same call
// as those that fit, eagerly and in a replayed graph.
TEST(CudaTp, AllReduceBeyondP2pCapacityUsesNccl) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  SPEAR_REQUIRE_PEER_ACCESS();
  ScopedEnv capacity("SPEAR_TP_P2P_CAPACITY", "8192");
  run_two_ranks(
      [](int r, cuda::CudaBackend& be) {
        EXPECT_EQ(be.tp_reduce_description(), "p2p (≤ 8192 elements) + nccl");
        const std::vector<Spec> specs = {
            {4, 4096, false}, {2, 4096, false}, {2, 4096, true}, {1, 4096, true}, {3, 17, true}};
        const std::vector<bool> p2p = {false, true, false, true, true};
        reduce_and_check(r, be, specs, p2p, 2, false, "capacity 8192, eager");
        reduce_and_check(r, be, specs, p2p, 4, true, "capacity 8192, graph");
        reduce_and_check(r, be, {{4, 4096, false}}, {false}, 2, false, "capacity 8192, NCCL alone");
      },
      TpReduce::P2p);
}

TEST(CudaTp, NcclOnlyReduction) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  run_two_ranks(
      [](int r, cuda::CudaBackend& be) {
        EXPECT_EQ(be.tp_reduce_description(), "nccl");
        const std::vector<Spec> specs = {{3, 1000, false}, {3, 17, true}, {1, 4096, false}};
        reduce_and_check(r, be, specs, {false, false, false}, 2, false, "nccl, eager");
        reduce_and_check(r, be, specs, {false, false, false}, 4, true, "nccl, graph");
      },
      TpReduce::Nccl);
}

// The two halves with nothing between them are the naive path itself, bit for bit: dense and W4 linears,
// static and gated compensators, with and without a bias, decode and prefill token counts.
TEST(CudaTp, EcPartialThenExpandEqualsLinear) {
  SPEAR_REQUIRE_GPU();
  cuda::CudaBackend be;
  be.set_ec_path(EcPath::Naive);  // the other paths compute A·x in bf16 and round differently
  uint32_t seed = 11;
  for (const bool quantized : {false, true}) {
    for (const int gate : {0, 8}) {
      const int n = 200, k = 136, rank = 16;
      const LinearWeights dense = random_dense(n, k, gate > 0, seed++);
      std::unique_ptr<Linear> lin =
          quantized ? be.make_quant_linear("test", w4test::random_quantized(n, k, 4, -1, seed++), dense.bias)
                    : be.make_linear(dense);
      auto partial_without_ec = [&] {
        Tensor x = be.alloc(1, k), y = be.alloc(1, n), z = be.alloc_f32(1, rank);
        be.linear_ec_partial(x, *lin, y, z);
      };
      EXPECT_SPEAR_ERROR(partial_without_ec(), "no compensator");
      const Compensator c = w4test::random_compensator(k, n, rank, gate, seed++);
      be.set_compensator(*lin, &c);
      for (const int m : {1, 5, 40}) {
        Tensor x = be.upload(random_x(m, k, seed++).data(), m, k);
        Tensor want = be.alloc(m, n), got = be.alloc(m, n), z = be.alloc_f32(m, rank);
        be.linear(x, *lin, want);
        be.linear_ec_partial(x, *lin, got, z);
        be.ec_expand(z, *lin, got);
        expect_equal(
            read(be, got), read(be, want),
            std::string(quantized ? "W4" : "dense") + " gate " + std::to_string(gate) + " m " + std::to_string(m));
      }
    }
  }
}

// A row-parallel compensated linear as tensor parallelism runs it: each rank holds half of the input features
// (of W and of A; B, the gate and the bias once, on rank 0), sums its partial output and partial A·x with the
// other rank, then applies the gate to the full A·x. Equal to the whole linear up to the bf16 rounding of the
// partial outputs, and identical on both ranks.
TEST(CudaTp, RowParallelCompensatedLinearMatchesWhole) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  const int n = 192, k = 256, half = k / 2, rank = 16, gate = 8, m = 5;
  const LinearWeights w = random_dense(n, k, true, 21);
  const Compensator c = w4test::random_compensator(k, n, rank, gate, 22);
  const std::vector<float> x = random_x(m, k, 23);
  std::vector<float> whole, plain;
  {
    cuda::CudaBackend be(0);
    be.set_ec_path(EcPath::Naive);
    auto lin = be.make_linear(w);
    Tensor xt = be.upload(x.data(), m, k), y = be.alloc(m, n);
    be.linear(xt, *lin, y);
    plain = read(be, y);
    be.set_compensator(*lin, &c);
    be.linear(xt, *lin, y);
    whole = read(be, y);
  }
  ASSERT_GT(rel_err(plain, whole), 0.1) << "the EC term is too small to test anything";
  std::vector<float> got[2];
  run_two_ranks([&](int r, cuda::CudaBackend& be) {
    LinearWeights wr = w;
    wr.in_features = half;
    wr.w = columns(w.w, n, k, r * half, half);
    if (r != 0) wr.bias.clear();
    Compensator cr = c;
    cr.in = half;
    cr.A = columns(c.A, rank, k, r * half, half);
    auto lin = be.make_linear(wr);
    be.set_compensator(*lin, &cr);
    const std::vector<float> xr = columns(x, m, k, r * half, half);
    Tensor xt = be.upload(xr.data(), m, half), y = be.alloc(m, n), z = be.alloc_f32(m, rank);
    be.linear_ec_partial(xt, *lin, y, z);
    Tensor* ts[] = {&y, &z};
    be.all_reduce_sum(ts);
    be.ec_expand(z, *lin, y);
    got[r] = read(be, y);
  });
  ASSERT_EQ(got[0].size(), whole.size());
  EXPECT_LT(rel_err(got[0], whole), 1e-2);
  expect_equal(got[1], got[0], "rank 1 against rank 0");
}

// The fused tail (TpReduce::Fused): a row-parallel linear split by input columns (W and A; the bias, B and the gate
// as tensor parallelism shards them), then the reduction, EC, residual add and next RMSNorm in one kernel, against
// the unfused sequence (linear_ec_partial or linear, all_reduce_sum, ec_expand, add_rms_norm): without an EC, with
// a gated one projected in the kernel, and with one whose shard is wide enough that z comes from ec_project; W4
// shards without and with an EC, the tail pushing their rows (default) and their decode GEMM storing them into the
// peer's staging from its epilogue (the P2P dual-write, set_tp_gemm_push); T = 1 and 5 eagerly, T = 1 also in a
// replayed graph; nothing done for 65 tokens.
TEST(CudaTp, FusedRowParallelTailMatchesUnfused) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  SPEAR_REQUIRE_PEER_ACCESS();
  struct Case {
    int half, rank, gate;  // per-rank input columns; EC rank 0: no EC
    bool w4;               // the shard as RTN W4 codes of its columns
    bool push;             // W4: the GEMM's epilogue dual-writes its rows
  };
  const std::vector<Case> cases = {{192, 0, 0, false, false}, {192, 16, 8, false, false}, {4160, 16, 8, false, false},
                                   {512, 0, 0, true, false},   {512, 16, 8, true, false},  {512, 0, 0, true, true},
                                   {512, 16, 8, true, true}};
  constexpr int kCases = 7;
  const int n = 256;
  const float eps = 1e-5f;
  std::vector<float> norm_w = random_x(1, n, 31);
  for (float& v : norm_w) v = 1.f + 0.1f * v;
  // [case][T index][rank]: h and x after the fused tail, compared across ranks once both are done.
  std::vector<float> got_h[kCases][2][2], got_x[kCases][2][2];
  run_two_ranks(
      [&](int r, cuda::CudaBackend& be) {
        EXPECT_EQ(be.tp_reduce_description(), "p2p (≤ 1048576 elements) + fused tail (≤ 64 rows) + nccl");
        Tensor w_norm = be.upload(norm_w.data(), 1, n);
        for (size_t ci = 0; ci < cases.size(); ++ci) {
          const Case& cs = cases[ci];
          be.set_tp_gemm_push(cs.push);
          const int k = 2 * cs.half;
          const uint32_t seed = 40 + 10 * uint32_t(ci);
          const LinearWeights w = random_dense(n, k, true, seed);
          LinearWeights wr = w;
          wr.in_features = cs.half;
          wr.w = columns(w.w, n, k, r * cs.half, cs.half);
          if (r != 0) wr.bias.clear();
          auto lin = cs.w4 ? be.make_quant_linear(
                                 "test", w4test::random_quantized(n, cs.half, 4, -1, seed + 7 * uint32_t(r)), wr.bias)
                           : be.make_linear(wr);
          if (cs.rank > 0) {
            const Compensator c = w4test::random_compensator(k, n, cs.rank, cs.gate, seed + 1);
            Compensator cr = c;
            cr.in = cs.half;
            cr.A = columns(c.A, cs.rank, k, r * cs.half, cs.half);
            be.set_compensator(*lin, &cr);
          }
          for (int ti = 0; ti < 2; ++ti) {
            const int T = ti == 0 ? 1 : 5;
            const std::string what =
                "case " + std::to_string(ci) + " T " + std::to_string(T) + " rank " + std::to_string(r);
            const std::vector<float> x = random_x(T, k, seed + 2 + uint32_t(T));
            const std::vector<float> resid = random_x(T, n, seed + 3 + uint32_t(T));
            const std::vector<float> xr = columns(x, T, k, r * cs.half, cs.half);
            Tensor in = be.upload(xr.data(), T, cs.half);
            // Unfused.
            Tensor y = be.alloc(T, n), xu = be.upload(resid.data(), T, n), hu = be.alloc(T, n);
            if (cs.rank > 0) {
              Tensor z = be.alloc_f32(T, cs.rank);
              be.linear_ec_partial(in, *lin, y, z);
              Tensor* ts[] = {&y, &z};
              be.all_reduce_sum(ts);
              be.ec_expand(z, *lin, y);
            } else {
              be.linear(in, *lin, y);
              Tensor* ts[] = {&y};
              be.all_reduce_sum(ts);
            }
            be.add_rms_norm(xu, y, w_norm, eps, hu);
            const std::vector<float> want_h = read(be, hu), want_x = read(be, xu);
            // Fused.
            Tensor xf = be.upload(resid.data(), T, n), hf = be.alloc(T, n);
            ASSERT_TRUE(be.row_parallel_tail(in, *lin, xf, w_norm, eps, hf)) << what;
            got_h[ci][ti][r] = read(be, hf);
            got_x[ci][ti][r] = read(be, xf);
            EXPECT_LT(rel_err(got_h[ci][ti][r], want_h), 1e-2) << what << ": h";
            EXPECT_LT(rel_err(got_x[ci][ti][r], want_x), 1e-2) << what << ": x";
            if (T != 1) continue;
            // In a graph (run 0 eager, run 1 captures, run 2 replays), x reset before each run.
            TinyBatch batch(be);
            for (int run = 0; run < 3; ++run) {
              write(be, xf, resid);
              Tensor out = be.run_graph(1000 + ci, [&] {
                Tensor hg = be.alloc(T, n);
                EXPECT_TRUE(be.row_parallel_tail(in, *lin, xf, w_norm, eps, hg));
                return hg;
              });
              expect_equal(read(be, out), got_h[ci][ti][r], what + ": graph run " + std::to_string(run) + ", h");
              expect_equal(read(be, xf), got_x[ci][ti][r], what + ": graph run " + std::to_string(run) + ", x");
            }
          }
          // Beyond the staging's 64 rows: nothing done, the caller reduces op by op.
          Tensor in65 = be.alloc(65, cs.half), x65 = be.alloc(65, n), h65 = be.alloc(65, n);
          EXPECT_FALSE(be.row_parallel_tail(in65, *lin, x65, w_norm, eps, h65)) << "case " << ci;
        }
      },
      TpReduce::Fused);
  for (int ci = 0; ci < kCases; ++ci)
    for (int ti = 0; ti < 2; ++ti) {
      const std::string what = "case " + std::to_string(ci) + " T index " + std::to_string(ti) + ", rank 1 vs 0";
      expect_equal(got_h[ci][ti][1], got_h[ci][ti][0], what + ": h");
      expect_equal(got_x[ci][ti][1], got_x[ci][ti][0], what + ": x");
    }
}

// Without a process group (or without TpReduce::Fused) there is no tail: the decoder's op-by-op path runs.
TEST(CudaTp, RowParallelTailDeclinesWithoutGroup) {
  SPEAR_REQUIRE_GPU();
  const int n = 64, k = 32, T = 1;
  for (const bool fused : {false, true}) {
    cuda::CudaBackend be;
    if (fused) be.set_tp_reduce(TpReduce::Fused);
    auto lin = be.make_linear(random_dense(n, k, false, 51));
    Tensor in = be.alloc(T, k), x = be.alloc(T, n), h = be.alloc(T, n), w = be.alloc(1, n);
    EXPECT_FALSE(be.row_parallel_tail(in, *lin, x, w, 1e-5f, h)) << "fused " << fused;
    EXPECT_EQ(be.tp_reduce_description(), "none");
  }
}

}  // namespace spear
