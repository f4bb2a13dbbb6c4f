// Tensor parallelism on the CPU: the shard helpers against their whole weights, and a model split over 2 and 4 ranks
// (threads of this process, joined by a TCP process group as separate processes would be) against the same model on one
// rank, with and without W4 weights and error compensators.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "model/tensor_parallel.h"
#include "quant/quantize_model.h"
#include "spear/random_ec.h"
#include "test_util.h"

namespace spear {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float s = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, s);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / den);
}

TEST(TensorParallelShard, DenseRowsAndColumnsReassemble) {
  LinearWeights w;
  w.name = "model.layers.0.mlp.down_proj";
  w.out_features = 6, w.in_features = 8;
  w.w = randn(48, 1);
  w.bias = randn(6, 2);
  for (int r = 0; r < 2; ++r) {
    LinearWeights rows = shard_linear(w, ShardKind::OutRows, r, 2), cols = shard_linear(w, ShardKind::InCols, r, 2);
    ASSERT_EQ(rows.out_features, 3);
    ASSERT_EQ(cols.in_features, 4);
    for (int o = 0; o < 3; ++o)
      for (int i = 0; i < 8; ++i) EXPECT_EQ(rows.w[size_t(o * 8 + i)], w.w[size_t((r * 3 + o) * 8 + i)]);
    for (int o = 0; o < 6; ++o)
      for (int i = 0; i < 4; ++i) EXPECT_EQ(cols.w[size_t(o * 4 + i)], w.w[size_t(o * 8 + r * 4 + i)]);
    EXPECT_EQ(rows.bias, std::vector<float>(w.bias.begin() + r * 3, w.bias.begin() + r * 3 + 3));
    // Summed partial outputs must add the bias once.
    EXPECT_EQ(cols.bias.size(), r == 0 ? 6u : 0u);
  }
  EXPECT_SPEAR_ERROR(shard_linear(w, ShardKind::OutRows, 0, 4), "do not split over 4");
}

TEST(TensorParallelShard, QuantizedShardsDequantizeToTheSlices) {
  for (int group : {-1, 32}) {
    QuantizedMatrix m;
    m.out = 6, m.in = 128;
    m.params.bits = 4;
    m.params.group_size = group;
    const int G = m.params.groups(m.in);
    std::mt19937 rng(3);
    m.q.resize(size_t(m.out) * m.in);
    for (auto& q : m.q) q = uint8_t(rng() % 16);
    m.scales = randn(size_t(m.out) * G, 4, 0.01f);
    m.zeros.resize(m.scales.size());
    for (auto& z : m.zeros) z = uint8_t(rng() % 16);
    const std::vector<float> full = m.dequantize();
    const PackedQuantWeights p = pack_quantized(m);
    for (int r = 0; r < 2; ++r) {
      const auto rows = unpack_quantized(shard_quant("q_proj", p, ShardKind::OutRows, r, 2)).dequantize();
      const auto cols = unpack_quantized(shard_quant("o_proj", p, ShardKind::InCols, r, 2)).dequantize();
      for (int o = 0; o < 3; ++o)
        for (int i = 0; i < 128; ++i) ASSERT_EQ(rows[size_t(o * 128 + i)], full[size_t((r * 3 + o) * 128 + i)]);
      for (int o = 0; o < 6; ++o)
        for (int i = 0; i < 64; ++i) ASSERT_EQ(cols[size_t(o * 64 + i)], full[size_t(o * 128 + r * 64 + i)]);
    }
  }
  QuantizedMatrix m;
  m.out = 2, m.in = 96;
  m.params.bits = 4;
  m.params.group_size = 32;
  m.q.assign(size_t(2 * 96), 1);
  m.scales.assign(6, 1.f);
  m.zeros.assign(6, 0);
  // 96 / 2 = 48 columns per rank: not whole groups of 32.
  EXPECT_SPEAR_ERROR(shard_quant("o_proj", pack_quantized(m), ShardKind::InCols, 0, 2), "whole quantization groups");
}

TEST(TensorParallelShard, CompensatorPartialProjectionsSumToTheWhole) {
  Compensator c;
  c.module = "model.layers.0.self_attn.o_proj";
  c.resize(16, 10, 4, 3);
  c.A = randn(c.A.size(), 5);
  c.B = randn(c.B.size(), 6);
  c.init_gate(3, 0.5f, 7);
  c.W2 = randn(c.W2.size(), 8, 0.3f);
  const int T = 3;
  const std::vector<float> x = randn(size_t(T) * 16, 9);
  std::vector<float> z(size_t(T) * 4), y(size_t(T) * 10, 0.f);
  compensator_project(c, x.data(), T, z.data());
  compensator_apply(c, x.data(), T, y.data());
  std::vector<float> zsum(z.size(), 0.f);
  for (int r = 0; r < 2; ++r) {
    const Compensator part = shard_compensator(c, ShardKind::InCols, r, 2);
    std::vector<float> xr(size_t(T) * 8), zr(z.size());
    for (int t = 0; t < T; ++t) std::copy_n(x.begin() + t * 16 + r * 8, 8, xr.begin() + t * 8);
    compensator_project(part, xr.data(), T, zr.data());
    for (size_t i = 0; i < z.size(); ++i) zsum[i] += zr[i];
    // Column-parallel: the whole z, this rank's rows of B.
    const Compensator rows = shard_compensator(c, ShardKind::OutRows, r, 2);
    std::vector<float> yr(size_t(T) * 5, 0.f);
    compensator_apply(rows, x.data(), T, yr.data());
    for (int t = 0; t < T; ++t)
      for (int o = 0; o < 5; ++o) EXPECT_NEAR(yr[size_t(t * 5 + o)], y[size_t(t * 10 + r * 5 + o)], 1e-5f);
  }
  for (size_t i = 0; i < z.size(); ++i) EXPECT_NEAR(zsum[i], z[i], 1e-5f);
  std::vector<float> y2(y.size(), 0.f);
  compensator_expand(c, zsum.data(), T, y2.data());
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y2[i], y[i], 1e-4f);
}

// Runs fn(rank, model) on `size` ranks, each a thread with its own CPU backend joined by a TCP process group.
void run_ranks(int size, const std::string& dir, const std::function<void(int, Model&)>& fn) {
  auto pg0 = ProcessGroup::listen(size, 0);
  const int port = pg0->port();
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<size_t>(size));
  auto body = [&](int rank, std::shared_ptr<ProcessGroup> pg) {
    try {
      CpuBackend be;
      be.set_process_group(std::move(pg));
      auto m = Model::load(dir, be);
      fn(rank, *m);
    } catch (const std::exception& e) {
      errors[size_t(rank)] = e.what();
    }
  };
  for (int r = 1; r < size; ++r)
    threads.emplace_back([&, r] { body(r, ProcessGroup::connect(r, size, "127.0.0.1", port, 30)); });
  pg0->accept_peers(30);
  body(0, std::move(pg0));
  for (auto& t : threads) t.join();
  for (int r = 0; r < size; ++r) EXPECT_EQ(errors[size_t(r)], "") << "rank " << r;
}

// A prefill of two sequences, then decode steps: the logits of every step, and greedy tokens.
struct Trace {
  std::vector<float> logits;
  std::vector<int32_t> greedy;
};

Trace trace(Model& m) {
  Trace t;
  auto cache = m.make_kv_cache(2, 64);
  Batch b;
  b.tokens = {5, 17, 230, 4000, 12, 99, 1000, 7};
  b.seqs = {{0, 5, 0, 0}, {5, 3, 0, 1}};
  t.logits = m.forward(b, *cache, LogitsMode::All);
  std::vector<int32_t> next = m.forward_greedy(Batch{{4000, 7}, {{0, 1, 5, 0}, {1, 1, 3, 1}}}, *cache);
  for (int step = 0; step < 10; ++step) {
    t.greedy.insert(t.greedy.end(), next.begin(), next.end());
    Batch d;
    d.tokens = next;
    d.seqs = {{0, 1, 6 + step, 0}, {1, 1, 4 + step, 1}};
    if (step == 9) {
      auto last = m.forward(d, *cache, LogitsMode::LastPerSeq);
      t.logits.insert(t.logits.end(), last.begin(), last.end());
    } else {
      next = m.forward_greedy(d, *cache);
    }
  }
  return t;
}

Trace trace_tp(int size, const std::string& dir, double ec_density) {
  std::vector<Trace> per_rank(static_cast<size_t>(size));
  run_ranks(size, dir, [&](int rank, Model& m) {
    if (ec_density > 0) attach_random_compensators(m, ec_density, 8, 4, 1234);
    per_rank[size_t(rank)] = trace(m);
  });
  for (int r = 1; r < size; ++r) {  // the star reduction gives every rank the same sums
    EXPECT_EQ(per_rank[size_t(r)].logits, per_rank[0].logits) << "rank " << r;
    EXPECT_EQ(per_rank[size_t(r)].greedy, per_rank[0].greedy) << "rank " << r;
  }
  return per_rank[0];
}

Trace trace_single(const std::string& dir, double ec_density) {
  CpuBackend be;
  auto m = Model::load(dir, be);
  if (ec_density > 0) attach_random_compensators(*m, ec_density, 8, 4, 1234);
  return trace(*m);
}

TEST(TensorParallelModel, SplitOverTwoAndFourRanksMatchesOneRank) {
  const Trace one = trace_single(test::ref_model_dir(), 0);
  for (int size : {2, 4}) {
    const Trace tp = trace_tp(size, test::ref_model_dir(), 0);
    ASSERT_EQ(tp.logits.size(), one.logits.size());
    EXPECT_LT(rel_l2(tp.logits, one.logits), 1e-5) << "tp " << size;  // fp32, only the summation order differs
    EXPECT_EQ(tp.greedy, one.greedy) << "tp " << size;
  }
}

TEST(TensorParallelModel, W4PackageWithCompensatorsMatchesOneRank) {
  const std::string pkg = test::scratch_dir("tp_w4") + "/pkg";
  QuantizeOptions q;
  q.params.bits = 4;
  q.params.group_size = 64;  // 1536 / 4 = 384 MLP columns per rank: whole groups
  quantize_model(test::ref_model_dir(), pkg, q);
  const Trace plain = trace_single(pkg, 0), one = trace_single(pkg, 1.0);
  ASSERT_GT(rel_l2(one.logits, plain.logits), 1e-3);  // the compensators matter, so matching them is a check
  for (int size : {2, 4}) {
    const Trace tp = trace_tp(size, pkg, 1.0);
    EXPECT_LT(rel_l2(tp.logits, one.logits), 1e-5) << "tp " << size;
    EXPECT_EQ(tp.greedy, one.greedy) << "tp " << size;
  }
}

// Serving: rank 0 leads, rank 1 replays its KV caches and passes until rank 0's model is gone.
TEST(TensorParallelModel, FollowerReplaysTheLeader) {
  const Trace one = trace_single(test::ref_model_dir(), 0.5);
  Trace led;
  run_ranks(2, test::ref_model_dir(), [&](int rank, Model& m) {
    attach_random_compensators(m, 0.5, 8, 4, 1234);
    if (rank == 0) {
      m.lead();
      led = trace(m);
      auto extra = m.make_kv_cache(1, 8);  // freed before the model: the follower frees its copy
    } else {
      m.follow();  // returns when rank 0's model is destroyed
    }
  });
  EXPECT_LT(rel_l2(led.logits, one.logits), 1e-5);
  EXPECT_EQ(led.greedy, one.greedy);
}

TEST(TensorParallelModel, UnsplittableShapesAndCalibrationAreRefused) {
  // 8 attention heads over 3 ranks.
  auto pg0 = ProcessGroup::listen(3, 0);
  const int port = pg0->port();
  std::thread a([&] { ProcessGroup::connect(1, 3, "127.0.0.1", port, 10)->barrier(); });
  std::thread b([&] { ProcessGroup::connect(2, 3, "127.0.0.1", port, 10)->barrier(); });
  pg0->accept_peers(10);
  std::shared_ptr<ProcessGroup> pg(std::move(pg0));
  CpuBackend be;
  be.set_process_group(pg);
  EXPECT_SPEAR_ERROR(Model::load(test::ref_model_dir(), be), "do not split over 3");
  pg->barrier();
  a.join(), b.join();

  run_ranks(2, test::ref_model_dir(), [&](int, Model& m) {
    auto cache = m.make_kv_cache(1, 8);
    TapFn tap = [](const std::string&, TapPoint, const Tensor&) {};
    const std::vector<int32_t> ids = {1, 2, 3};
    EXPECT_SPEAR_ERROR(m.forward(Batch::single(ids, 0), *cache, LogitsMode::All, &tap), "tensor parallelism");
    Tensor x = m.embed(Batch::single(ids, 0));
    EXPECT_SPEAR_ERROR(m.run_layer(0, x, Batch::single(ids, 0), *cache), "tensor parallelism");
  });
}

}  // namespace
}  // namespace spear
