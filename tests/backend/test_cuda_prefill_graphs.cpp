// Prefill iterations replayed as CUDA graphs (CudaBackend::run_graph with prefill keys) against the same
// iterations run eagerly: same greedy tokens after every prefill and the decode steps that follow, with new
// prompt tokens each time (the graph must read the batch's device arrays, not the ones it was captured with),
// with compensators on the overlapped path (its second stream is a branch of the graph), and with the graph
// cache bounded to one shape while two alternate.
#include <cstdlib>
#include <filesystem>
#include <random>

#include <gtest/gtest.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "model/model.h"
#include "quant/quantize_model.h"
#include "spear/compensator.h"
#include "test_util.h"

namespace spear {
namespace {

#define SPEAR_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

const std::string& w4_package() {
  static std::string dir = [] {
    std::string d = test::scratch_dir("cuda_prefill_graph_pkg");
    std::filesystem::remove_all(d);
    QuantizeOptions o;
    quantize_model(test::ref_model_dir(), d, o);
    return d;
  }();
  return dir;
}

std::vector<Compensator> random_compensators(Model& m) {
  auto dims = m.linear_dims();
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<Compensator> ecs;
  int i = 0;
  for (const std::string name : {"model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj",
                                 "model.layers.2.self_attn.o_proj", "model.layers.4.mlp.gate_proj"}) {
    Compensator c;
    c.module = name;
    c.resize(dims[name].second, dims[name].first, 16, (i++ % 2) ? 0 : 8);
    for (auto* v : {&c.A, &c.B, &c.W1, &c.b1, &c.W2, &c.b2})
      for (float& x : *v) x = 0.05f * nd(rng);
    c.round_to_bf16();
    ecs.push_back(c);
  }
  return ecs;
}

// Prompt lengths of two sequences per round; rounds of one shape replay its graph after the first two.
struct Round {
  int a, b;
};

// The greedy tokens of every round: the prefill's two, then `steps` decode steps of both sequences.
std::vector<int32_t> run_rounds(Model& m, const std::vector<Round>& rounds, int steps) {
  auto cache = m.make_kv_cache(2, 256);
  std::mt19937 rng(17);
  std::vector<int32_t> out;
  for (const Round& r : rounds) {
    Batch pre;
    pre.seqs = {{0, r.a, 0, 0}, {r.a, r.b, 0, 1}};  // (token_begin, n_tokens, pos0, kv_slot)
    for (int i = 0; i < r.a + r.b; ++i) pre.tokens.push_back(int32_t(rng() % 8000));
    std::vector<int32_t> next = m.forward_greedy(pre, *cache);
    for (int s = 0; s < steps; ++s) {
      out.insert(out.end(), next.begin(), next.end());
      Batch b;
      b.seqs = {{0, 1, r.a + s, 0}, {1, 1, r.b + s, 1}};
      b.tokens = next;
      next = m.forward_greedy(b, *cache);
    }
  }
  return out;
}

}  // namespace

TEST(CudaPrefillGraphs, ReplaysEqualEagerPrefillsWithOverlappedCompensators) {
  SPEAR_REQUIRE_GPU();
  // One key (240 tokens, 2 sequences) split four ways: the split lives in the batch's device arrays.
  const std::vector<Round> one_key = {{150, 90}, {100, 140}, {150, 90}, {60, 180}, {150, 90}};
  // Two keys (240 and 210 tokens) in turn.
  const std::vector<Round> two_keys = {{150, 90}, {40, 170}, {150, 90}, {40, 170}, {150, 90}, {40, 170}};
  // Two keys with one graph kept: the second key's first run evicts the first key's graph.
  const std::vector<Round> capped = {{150, 90}, {150, 90}, {150, 90}, {40, 170}, {40, 170}, {40, 170}};
  const std::vector<Round>* lists[3] = {&one_key, &two_keys, &capped};
  std::vector<int32_t> want[3], got[3];
  size_t kept[3] = {0, 0, 0};
  for (int graphs = 0; graphs < 3; ++graphs) {
    // 0: eager prefills; 1: prefill graphs; 2: prefill graphs, at most one shape kept.
    setenv("SPEAR_PREFILL_GRAPHS", graphs ? "1" : "0", 1);
    setenv("SPEAR_PREFILL_GRAPH_CAP", graphs == 2 ? "1" : "32", 1);
    cuda::CudaBackend gpu;
    auto m = Model::load(w4_package(), gpu);
    const std::vector<Compensator> ecs = random_compensators(*m);
    for (const Compensator& c : ecs) gpu.set_compensator(*m->linear_slot(c.module), &c);
    gpu.set_ec_path(EcPath::Overlapped);
    for (int l = 0; l < 3; ++l) {
      if (graphs && (l == 2) != (graphs == 2)) continue;
      (graphs ? got : want)[l] = run_rounds(*m, *lists[l], 3);
      if (graphs) kept[l] = gpu.graphs_kept(true);
    }
    if (!graphs) {
      EXPECT_EQ(gpu.graphs_kept(true), 0u);
    }
  }
  unsetenv("SPEAR_PREFILL_GRAPHS");
  unsetenv("SPEAR_PREFILL_GRAPH_CAP");
  // The graphs ran: one for the first cache, two more for the second (a cache's graphs record its pages), one kept
  // under the cap.
  EXPECT_EQ(kept[0], 1u);
  EXPECT_EQ(kept[1], 3u);
  EXPECT_EQ(kept[2], 1u);
  ASSERT_EQ(want[0].size(), size_t(5 * 3 * 2));
  for (int l = 0; l < 3; ++l) EXPECT_EQ(got[l], want[l]) << "round list " << l;
  // New prompts each round must give new tokens (else a replay of stale inputs could pass).
  EXPECT_NE(std::vector<int32_t>(want[0].begin(), want[0].begin() + 6),
            std::vector<int32_t>(want[0].begin() + 12, want[0].begin() + 18));
}

}  // namespace spear
