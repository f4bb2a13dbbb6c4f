// Tensor parallelism on the CUDA backend: NCCL all-reduce of bf16 and fp32 tensors in one call, eager and
// inside replayed CUDA graphs, on two GPUs (one thread and one backend per rank, bootstrapped over a TCP
// ProcessGroup); the compensated linear split around the all-reduce (linear_ec_partial, then ec_expand)
// bit-identical to linear() on one GPU; and a row-parallel compensated linear over two ranks against the whole
// linear. The two-GPU tests skip without two devices or without NCCL.
#include <cmath>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nccl_loader.h"
#include "core/dtype.h"
#include "parallel/process_group.h"
#include "quant/quantizer.h"
#include "spear/compensator.h"
#include "test_util.h"

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

// Runs fn(rank, backend) on GPUs 0 and 1, one thread each, once both backends belong to one two-rank group.
// Failures inside a rank (spear::Error, CUDA, NCCL) are reported as test failures naming the rank.
void run_two_ranks(const std::function<void(int, cuda::CudaBackend&)>& fn) {
  // NVLink SHARP (multicast) buys nothing for two ranks, and its setup can take a shared host's GPUs out of
  // service; the environment may still turn it on.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
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

PackedQuantWeights random_w4(int out, int in, int group, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::vector<float> w(size_t(out) * in);
  for (float& v : w) v = nd(rng);
  QuantParams qp;
  qp.bits = 4;
  qp.group_size = group;
  return pack_quantized(rtn_quantize(w.data(), out, in, qp));
}

// The EC term is about a third of the output (as in test_cuda_ec.cpp), so that a wrong split cannot pass.
Compensator random_ec(int in, int out, int rank, int gate, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Compensator c;
  c.module = "test";
  c.resize(in, out, rank, 0);
  const float sa = 1.f / std::sqrt(float(in)), sb = 0.3f * 0.02f * std::sqrt(float(in) / float(rank));
  for (float& v : c.A) v = sa * nd(rng);
  for (float& v : c.B) v = sb * nd(rng);
  if (gate > 0) {
    c.init_gate(gate, 1.f / std::sqrt(float(rank)), seed + 1);
    for (float& v : c.b1) v = 0.1f * nd(rng);
    for (float& v : c.W2) v = 0.5f * nd(rng) / std::sqrt(float(gate));
    for (float& v : c.b2) v = 0.1f * nd(rng);
  }
  c.round_to_bf16();
  return c;
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

TEST(CudaTp, AllReduceInsideReplayedGraph) {
  SPEAR_REQUIRE_TWO_GPUS_AND_NCCL();
  run_two_ranks([](int r, cuda::CudaBackend& be) {
    // run_graph keys graphs by the KV cache of the last begin_batch: a one-token batch on a tiny cache.
    auto cache = be.make_kv_cache(1, 1, 16, 8);
    BatchDesc d;
    d.tokens = {0};
    d.positions = {0};
    d.token_seq = {0};
    d.last_rows = {0};
    d.seqs = {SeqSlice{0, 1, 0, 0}};
    be.begin_batch(d, *cache);
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
          quantized ? be.make_quant_linear("test", random_w4(n, k, -1, seed++), dense.bias) : be.make_linear(dense);
      auto partial_without_ec = [&] {
        Tensor x = be.alloc(1, k), y = be.alloc(1, n), z = be.alloc_f32(1, rank);
        be.linear_ec_partial(x, *lin, y, z);
      };
      EXPECT_SPEAR_ERROR(partial_without_ec(), "no compensator");
      const Compensator c = random_ec(k, n, rank, gate, seed++);
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
  const Compensator c = random_ec(k, n, rank, gate, 22);
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

}  // namespace spear
