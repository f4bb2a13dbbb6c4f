// The CUDA backend end to end on the reference model: golden argmax parity, logits against the CPU backend,
// perplexity of the model and of its RTN W4 package within 0.2% of the CPU values, replayed decode graphs equal
// to eager steps, and a batch of sequences equal to each sequence alone.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "eval/perplexity.h"
#include "model/model.h"
#include "quant/quantize_model.h"
#include "runtime/sampler.h"
#include "spear/compensator.h"
#include "spear/random_ec.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace spear {

namespace {

#define SPEAR_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

nlohmann::json golden() {
  std::ifstream in(test::ref_model_dir() + "/golden.json");
  return nlohmann::json::parse(in);
}

// The RTN W4 per-channel package of the reference model, made once per test binary.
const std::string& w4_package() {
  static std::string dir = [] {
    std::string d = test::scratch_dir("cuda_w4_pkg");
    std::filesystem::remove_all(d);
    QuantizeOptions o;
    quantize_model(test::ref_model_dir(), d, o);
    return d;
  }();
  return dir;
}

std::vector<int32_t> greedy_eager(Model& m, KvCache& cache, std::vector<int32_t> prompt, int n) {
  std::vector<int32_t> out;
  const int V = m.config().vocab_size;
  int pos = 0;
  std::vector<int32_t> feed = prompt;
  for (int i = 0; i < n; ++i) {
    std::vector<float> logits = m.forward(Batch::single(feed, pos), cache, LogitsMode::LastPerSeq);
    pos += int(feed.size());
    int32_t t = argmax(std::span<const float>(logits.data(), size_t(V)));
    out.push_back(t);
    feed = {t};
  }
  return out;
}

}  // namespace

TEST(CudaBackend, GoldenArgmaxParityAndLogitsNearCpu) {
  SPEAR_REQUIRE_GPU();
  auto g = golden();
  std::vector<int32_t> ids = g["ids"].get<std::vector<int32_t>>();
  auto want_argmax = g["argmax"].get<std::vector<int32_t>>();
  cuda::CudaBackend gpu;
  CpuBackend cpu;
  auto mg = Model::load(test::ref_model_dir(), gpu);
  auto mc = Model::load(test::ref_model_dir(), cpu);
  auto cg = mg->make_kv_cache(1, 128);
  auto cc = mc->make_kv_cache(1, 128);
  std::vector<float> lg = mg->forward(Batch::single(ids, 0), *cg, LogitsMode::All);
  std::vector<float> lc = mc->forward(Batch::single(ids, 0), *cc, LogitsMode::All);
  ASSERT_EQ(lg.size(), lc.size());
  const int V = mg->config().vocab_size;
  double num = 0, den = 0, max_abs = 0;
  for (size_t i = 0; i < lg.size(); ++i) {
    num += (lg[i] - lc[i]) * double(lg[i] - lc[i]);
    den += double(lc[i]) * lc[i];
    max_abs = std::max(max_abs, double(std::fabs(lg[i] - lc[i])));
  }
  // Argmax parity with the golden (Hugging Face) argmax wherever the answer is decidable at bf16 precision:
  // a position may differ only when its top-2 logits (CPU, equal to golden within 2e-5) are closer than twice
  // the largest GPU-CPU logit difference. The reference model has one such near-tie (position 96: 0.030).
  int mismatch = 0, undecidable = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    std::span<const float> row(lc.data() + t * V, size_t(V));
    const int top = argmax(row);
    float second = -INFINITY;
    for (int c = 0; c < V; ++c)
      if (c != top) second = std::max(second, row[size_t(c)]);
    if (argmax(std::span<const float>(lg.data() + t * V, size_t(V))) != want_argmax[t]) {
      ++mismatch;
      const double margin = row[size_t(top)] - second;
      std::printf("position %zu: argmax differs from golden; top-2 margin %.3g\n", t, margin);
      if (margin < 2 * max_abs) ++undecidable;
    }
  }
  std::printf("cuda vs cpu logits: rel l2 %.3g, max abs %.3g; golden argmax mismatches %d / %zu (%d near-ties)\n",
              std::sqrt(num / den), max_abs, mismatch, ids.size(), undecidable);
  EXPECT_EQ(mismatch, undecidable);
  EXPECT_LE(mismatch, 2);
  EXPECT_LT(std::sqrt(num / den), 2e-2);  // bf16 activations and weights
}

TEST(CudaBackend, PerplexityWithinPointTwoPercentOfCpu) {
  SPEAR_REQUIRE_GPU();
  if (!std::filesystem::exists(test::shared_dir() + "/data/test.txt")) GTEST_SKIP() << "no ../shared/data/test.txt";
  Tokenizer tok = Tokenizer::from_dir(test::ref_model_dir());
  std::vector<int32_t> ids = tok.encode(test::read_file(test::shared_dir() + "/data/test.txt"), false);
  for (const std::string& dir : {test::ref_model_dir(), w4_package()}) {
    cuda::CudaBackend gpu;
    CpuBackend cpu;
    auto mg = Model::load(dir, gpu);
    auto mc = Model::load(dir, cpu);
    PerplexityResult rg = perplexity(*mg, ids, 512, 24);
    PerplexityResult rc = perplexity(*mc, ids, 512, 24);
    const double rel = std::fabs(rg.ppl - rc.ppl) / rc.ppl;
    std::printf("%s: ppl cuda %.4f cpu %.4f (%.3f%%), 24 windows\n", dir.c_str(), rg.ppl, rc.ppl, 100 * rel);
    EXPECT_LT(rel, 2e-3) << dir;
  }
}

// W4 linears of a prefill of >= 256 tokens run dequantization + cuBLAS BF16 (SPEAR_W4_DEQUANT_MIN_M, read when
// the backend is made); the same prefill with the variable at 0 runs the W4 kernel. Logits agree within bf16
// rounding (the dequantized weights are rounded to bf16 once, the W4 kernel scales fp32 sums), and the first
// backend really took the other path (its profile names the op).
TEST(CudaBackend, PrefillDequantPathMatchesW4Kernel) {
  SPEAR_REQUIRE_GPU();
  std::vector<int32_t> ids(300);
  std::mt19937 rng(3);
  for (auto& t : ids) t = int32_t(rng() % 8000);
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    setenv("SPEAR_W4_DEQUANT_MIN_M", i == 0 ? "256" : "0", 1);
    cuda::CudaBackend gpu;
    auto m = Model::load(w4_package(), gpu);
    auto cache = m->make_kv_cache(1, 320);
    logits[i] = m->forward(Batch::single(ids, 0), *cache, LogitsMode::All);
  }
  unsetenv("SPEAR_W4_DEQUANT_MIN_M");
  ASSERT_EQ(logits[0].size(), logits[1].size());
  double num = 0, den = 0, diff_sum = 0;
  for (size_t i = 0; i < logits[0].size(); ++i) {
    const double d = double(logits[0][i]) - logits[1][i];
    num += d * d, den += double(logits[1][i]) * logits[1][i], diff_sum += std::fabs(d);
  }
  std::printf("prefill of 300 tokens, dequant + cuBLAS vs W4 kernel: logits rel l2 %.3g\n", std::sqrt(num / den));
  EXPECT_LT(std::sqrt(num / den), 1e-2);
  EXPECT_GT(diff_sum, 0.0) << "identical logits: did the dequantized path run at all?";
}

// Batches of more tokens than the first batch staging holds (512): one 600-token prompt, then a mixed batch of
// a 530-token prompt with a decode token, equal to the CPU within bf16 rounding. (The staging once grew only
// when 4 ints per token overflowed it, so 513..1023 tokens failed with "batch staging too small".)
TEST(CudaBackend, BatchesBeyondTheFirstStagingCapacity) {
  SPEAR_REQUIRE_GPU();
  std::mt19937 rng(11);
  auto random_ids = [&](int n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& t : v) t = int32_t(rng() % 8000);
    return v;
  };
  const std::vector<int32_t> a = random_ids(600), b = random_ids(530);
  std::vector<float> got[2];
  for (int dev = 0; dev < 2; ++dev) {
    std::unique_ptr<Backend> be;
    if (dev == 0)
      be = std::make_unique<cuda::CudaBackend>();
    else
      be = std::make_unique<CpuBackend>();
    auto m = Model::load(test::ref_model_dir(), *be);
    auto cache = m->make_kv_cache(2, 640);
    std::vector<float> l1 = m->forward(Batch::single(a, 0), *cache, LogitsMode::LastPerSeq);
    Batch mixed;
    mixed.tokens = b;
    mixed.tokens.push_back(7);
    mixed.seqs = {{0, 530, 0, 1}, {530, 1, 600, 0}};  // (token_begin, n_tokens, pos0, kv_slot)
    std::vector<float> l2 = m->forward(mixed, *cache, LogitsMode::LastPerSeq);
    got[dev] = l1;
    got[dev].insert(got[dev].end(), l2.begin(), l2.end());
  }
  ASSERT_EQ(got[0].size(), got[1].size());
  double num = 0, den = 0;
  for (size_t i = 0; i < got[0].size(); ++i) {
    const double d = double(got[0][i]) - got[1][i];
    num += d * d, den += double(got[1][i]) * got[1][i];
  }
  EXPECT_LT(std::sqrt(num / den), 2e-2);
}

TEST(CudaBackend, DecodeGraphsEqualEagerStepsAndBatchEqualsSingle) {
  SPEAR_REQUIRE_GPU();
  for (const std::string& dir : {test::ref_model_dir(), w4_package()}) {
    cuda::CudaBackend gpu;
    auto m = Model::load(dir, gpu);
    const std::vector<std::vector<int32_t>> prompts = {{1, 450, 6593, 310}, {1, 3038, 2501, 263, 931, 727}, {1, 2987}};
    const int n = 24;
    // Each sequence alone, eager (no graphs: forward() never replays).
    std::vector<std::vector<int32_t>> alone;
    for (const auto& p : prompts) {
      auto c = m->make_kv_cache(1, 64);
      alone.push_back(greedy_eager(*m, *c, p, n));
    }
    // Together: one prefill of all prompts, then decode steps of 3 sequences (graph captured and replayed).
    auto cache = m->make_kv_cache(3, 64);
    Batch pre;
    for (int s = 0; s < 3; ++s) {
      pre.seqs.push_back({int(pre.tokens.size()), int(prompts[s].size()), 0, s});
      pre.tokens.insert(pre.tokens.end(), prompts[s].begin(), prompts[s].end());
    }
    std::vector<int32_t> next = m->forward_greedy(pre, *cache);
    std::vector<std::vector<int32_t>> together(3);
    for (int step = 0; step < n; ++step) {
      Batch b;
      for (int s = 0; s < 3; ++s) {
        together[s].push_back(next[s]);
        b.seqs.push_back({s, 1, int(prompts[s].size()) + step, s});
        b.tokens.push_back(next[s]);
      }
      if (step + 1 < n) next = m->forward_greedy(b, *cache);
    }
    // Batched launches (m = 12 prefill, m = 3 steps) may run other W4 plans than a sequence alone (m = 2..6, then
    // 1), which sum k in another order; on a random-weight W4 model that can flip a near-tie (seen once on an
    // H200 host whose plan tuning chose differently). So a difference is accepted only at a near-tie: at the first
    // step where the tokens part, the eager logits of both tokens lie within bf16 noise of each other.
    const int V = m->config().vocab_size;
    for (int s = 0; s < 3; ++s) {
      if (together[s] == alone[s]) continue;
      size_t k = 0;
      while (together[s][k] == alone[s][k]) ++k;
      auto c = m->make_kv_cache(1, 64);
      std::vector<int32_t> feed = prompts[s];
      feed.insert(feed.end(), alone[s].begin(), alone[s].begin() + std::ptrdiff_t(k));
      const std::vector<float> logits = m->forward(Batch::single(feed, 0), *c, LogitsMode::LastPerSeq);
      ASSERT_EQ(logits.size(), size_t(V));
      const float gap = logits[size_t(alone[s][k])] - logits[size_t(together[s][k])];
      std::printf("%s sequence %d: tokens part at step %zu (%d alone, %d batched), logit gap %.4f\n", dir.c_str(), s,
                  k, alone[s][k], together[s][k], gap);
      EXPECT_LT(std::fabs(gap), 0.125f) << dir << " sequence " << s << ": not a near-tie";
    }
    auto* kv = dynamic_cast<cuda::CudaKvCache*>(cache.get());
    ASSERT_NE(kv, nullptr);
    EXPECT_EQ(kv->blocks_in_use(), 3 * 2);  // up to 30 positions each: two 16-token pages per sequence
  }
}

// Random gated and static compensators on several modules: the GPU's naive EC path against the CPU backend's.
TEST(CudaBackend, CompensatorsMatchCpu) {
  SPEAR_REQUIRE_GPU();
  cuda::CudaBackend gpu;
  CpuBackend cpu;
  auto mg = Model::load(test::ref_model_dir(), gpu);
  auto mc = Model::load(test::ref_model_dir(), cpu);
  auto dims = mc->linear_dims();
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<Compensator> ecs;
  int i = 0;
  for (const std::string name : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                 "model.layers.3.self_attn.o_proj", "model.layers.5.mlp.up_proj"}) {
    Compensator c;
    c.module = name;
    const int gw = (i++ % 2) ? 0 : 8;
    c.resize(dims[name].second, dims[name].first, 8, gw);
    for (auto* v : {&c.A, &c.B, &c.W1, &c.b1, &c.W2, &c.b2})
      for (float& x : *v) x = 0.05f * nd(rng);
    c.round_to_bf16();
    ecs.push_back(c);
  }
  for (const Compensator& c : ecs) {
    gpu.set_compensator(*mg->linear_slot(c.module), &c);
    cpu.set_compensator(*mc->linear_slot(c.module), &c);
  }
  std::vector<int32_t> ids = golden()["ids"].get<std::vector<int32_t>>();
  auto cg = mg->make_kv_cache(1, 128);
  auto cc = mc->make_kv_cache(1, 128);
  std::vector<float> lg = mg->forward(Batch::single(ids, 0), *cg, LogitsMode::All);
  std::vector<float> lc = mc->forward(Batch::single(ids, 0), *cc, LogitsMode::All);
  // The compensators must move the logits (else the comparison proves nothing) ...
  CpuBackend cpu0;
  auto m0 = Model::load(test::ref_model_dir(), cpu0);
  auto c0 = m0->make_kv_cache(1, 128);
  std::vector<float> l0 = m0->forward(Batch::single(ids, 0), *c0, LogitsMode::All);
  double num = 0, den = 0, moved = 0;
  for (size_t k = 0; k < lg.size(); ++k) {
    num += (lg[k] - lc[k]) * double(lg[k] - lc[k]);
    den += double(lc[k]) * lc[k];
    moved += (l0[k] - lc[k]) * double(l0[k] - lc[k]);
  }
  std::printf("compensated logits: cuda vs cpu rel l2 %.3g; the compensators moved them by %.3g\n",
              std::sqrt(num / den), std::sqrt(moved / den));
  EXPECT_GT(std::sqrt(moved / den), 0.05);
  // ... and the GPU must agree with the CPU as closely as without them.
  EXPECT_LT(std::sqrt(num / den), 2e-2);
}

TEST(CudaBackend, ClearErrors) {
  SPEAR_REQUIRE_GPU();
  cuda::CudaBackend gpu;
  auto m = Model::load(test::ref_model_dir(), gpu);
  auto cache = m->make_kv_cache(1, 16);
  std::vector<int32_t> long_prompt(17, 1);
  EXPECT_THROW(m->forward(Batch::single(long_prompt, 0), *cache, LogitsMode::LastPerSeq), Error);
  std::vector<int32_t> bad = {1, m->config().vocab_size};
  EXPECT_THROW(m->forward(Batch::single(bad, 0), *cache, LogitsMode::LastPerSeq), Error);
}

}  // namespace spear

namespace spear {

namespace {

// Three prompt tokens per sequence, sequence s in cache slot s.
Batch three_token_prompts(int seqs) {
  Batch pre;
  for (int s = 0; s < seqs; ++s) {
    pre.seqs.push_back({int(pre.tokens.size()), 3, 0, s});
    for (int t : {1, 450 + 7 * s, 6593}) pre.tokens.push_back(t);
  }
  return pre;
}

// The prompts' last logits, then `steps` eager decode steps (forward(): no graphs) of every sequence, each fed
// ids[step · seqs + s]; returns all those logits. ids empty: the run feeds (and records) its own greedy tokens.
std::vector<float> teacher_forced_logits(Model& m, int seqs, int steps, std::vector<int32_t>& ids) {
  auto cache = m.make_kv_cache(seqs, 64);
  const int V = m.config().vocab_size;
  const bool record = ids.empty();
  std::vector<float> all = m.forward(three_token_prompts(seqs), *cache, LogitsMode::LastPerSeq);
  for (int step = 0; step < steps; ++step) {
    Batch b;
    for (int s = 0; s < seqs; ++s) {
      const size_t last = all.size() - size_t(seqs - s) * size_t(V);
      if (record) ids.push_back(argmax(std::span<const float>(all.data() + last, size_t(V))));
      b.seqs.push_back({s, 1, 3 + step, s});
      b.tokens.push_back(ids[size_t(step * seqs + s)]);
    }
    const std::vector<float> l = m.forward(b, *cache, LogitsMode::LastPerSeq);
    all.insert(all.end(), l.begin(), l.end());
  }
  return all;
}

// The greedy tokens of `steps` decode steps of every sequence after the prompts, through forward_greedy (each step's
// graph captured at its first run, then replayed).
std::vector<int32_t> greedy_graph_tokens(Model& m, int seqs, int steps) {
  auto cache = m.make_kv_cache(seqs, 64);
  std::vector<int32_t> greedy, next = m.forward_greedy(three_token_prompts(seqs), *cache);
  for (int step = 0; step < steps; ++step) {
    Batch b;
    for (int s = 0; s < seqs; ++s) {
      greedy.push_back(next[size_t(s)]);
      b.seqs.push_back({s, 1, 3 + step, s});
      b.tokens.push_back(next[size_t(s)]);
    }
    next = m.forward_greedy(b, *cache);
  }
  return greedy;
}

// Relative L2 distance of a from b.
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / den);
}

// The checks of an EC placement against the in-kernel EC and the CPU: `got` (logits of teacher-forced decode steps fed
// `ids`, with random ECs on 60% of the W4 package's linears, seed 4321) against `in_kernel` (the same run with every EC
// in its GEMM launch; the term is rounded once more, bf16 y then y + term), and against the CPU backend with the same
// compensators, which must move the CPU's logits, or the comparison proves nothing.
void expect_in_kernel_and_cpu(const char* what, int seqs, int steps, std::vector<int32_t>& ids,
                              const std::vector<float>& in_kernel, const std::vector<float>& got) {
  ASSERT_EQ(got.size(), in_kernel.size());
  const double vs_kernel = rel_l2(got, in_kernel);
  EXPECT_LT(vs_kernel, 1e-2) << what << ", " << seqs << " sequences";
  CpuBackend cpu;
  auto mc = Model::load(w4_package(), cpu);
  attach_random_compensators(*mc, 0.6, 16, 8, 4321);
  const std::vector<float> ref = teacher_forced_logits(*mc, seqs, steps, ids);
  CpuBackend cpu0;
  auto m0 = Model::load(w4_package(), cpu0);
  const double moved = rel_l2(teacher_forced_logits(*m0, seqs, steps, ids), ref), vs_cpu = rel_l2(got, ref);
  std::printf("%s, %d sequences: vs in-kernel %.2e, vs cpu %.2e (ECs moved the logits %.2e)\n", what, seqs, vs_kernel,
              vs_cpu, moved);
  EXPECT_GT(moved, 0.01) << what;
  EXPECT_LT(vs_cpu, 2e-2) << what << ", " << seqs << " sequences";
}

}  // namespace

// Decode steps of the reference model's W4 package with the fused MLP block (mlp_fused.h) against the op-by-op
// path, at 1 and 3 sequences (eager first step, then replayed graphs): the fused run is fed the op-by-op run's
// greedy tokens, and every step's logits must agree within bf16 noise, with the same argmax except at near-ties.
TEST(CudaBackend, FusedMlpDecodeMatchesOpByOp) {
  SPEAR_REQUIRE_GPU();
  constexpr int kSteps = 12;
  // Returns every step's logits; ids: the tokens fed at steps 1.. (filled by the run when empty: its greedy ids).
  auto run = [](bool fused, int seqs, std::vector<int32_t>& ids) {
    cuda::CudaBackend gpu;
    gpu.set_fused_mlp(fused);
    auto m = Model::load(w4_package(), gpu);
    return teacher_forced_logits(*m, seqs, kSteps, ids);
  };
  for (int seqs : {1, 3}) {
    std::vector<int32_t> ids;
    const std::vector<float> ref = run(false, seqs, ids), got = run(true, seqs, ids);
    ASSERT_EQ(got.size(), ref.size());
    const size_t V = ref.size() / size_t((kSteps + 1) * seqs);
    double worst = 0, any = 0;
    for (size_t r = 0; r * V < ref.size(); ++r) {
      const float* a = got.data() + r * V;
      const float* b = ref.data() + r * V;
      double num = 0, den = 0;
      for (size_t i = 0; i < V; ++i) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
      worst = std::max(worst, std::sqrt(num / den));
      any += num;
      const size_t ia = size_t(std::max_element(a, a + V) - a), ib = size_t(std::max_element(b, b + V) - b);
      if (ia != ib) {  // only at a near-tie of the op-by-op logits
        EXPECT_LT(std::fabs(b[ib] - b[ia]), 0.125f)
            << seqs << " sequences, row " << r << ": argmax " << ia << " vs " << ib;
      }
    }
    std::printf("fused MLP vs op by op, %d sequences: worst step logits rel l2 %.2e\n", seqs, worst);
    EXPECT_LT(worst, 2e-2) << seqs << " sequences";
    EXPECT_GT(any, 0.0) << "the fused path did not run (identical logits)";
  }
}

// The deferred EC (ec_after_gemm.h: plain W4 launches, each compensator's whole term in the launch after them: the
// norm launch for o and down, a launch of its own for q/k/v and gate/up) on the W4 package with random ECs on 60% of
// the linears: decode steps (eager, teacher-forced, then replayed graphs) against the same run with every EC in its W4
// launch, and against the CPU backend with the same compensators. The counters show that the deferred launches ran,
// in the captured steps too.
TEST(CudaBackend, DeferredEcMatchesInKernelAndCpu) {
  SPEAR_REQUIRE_GPU();
  constexpr int kSteps = 8;
  for (int seqs : {1, 3}) {
    std::vector<int32_t> ids;
    std::vector<float> logits[2];
    std::vector<int32_t> greedy[2];
    for (bool defer : {false, true}) {
      cuda::CudaBackend gpu;
      gpu.set_ec_defer(defer, 1, true);  // from one token, every linear: the norm launches and launches of their own
      gpu.set_ec_swiglu(0);  // the gate / up ECs in their own deferred launch, not the SwiGLU launch
      auto m = Model::load(w4_package(), gpu);
      gpu.set_ec_path(EcPath::Fused);
      attach_random_compensators(*m, 0.6, 16, 8, 4321);
      logits[defer] = teacher_forced_logits(*m, seqs, kSteps, ids);
      const size_t eager = gpu.deferred_ec_launches();
      greedy[defer] = greedy_graph_tokens(*m, seqs, kSteps);
      if (defer) {
        EXPECT_GE(eager, size_t(kSteps)) << seqs << " sequences: no deferred EC ran";
        EXPECT_GT(gpu.deferred_ec_launches(), eager) << seqs << " sequences: not in the captured steps";
      } else {
        EXPECT_EQ(gpu.deferred_ec_launches(), 0u);
      }
    }
    expect_in_kernel_and_cpu("deferred EC", seqs, kSteps, ids, logits[0], logits[1]);
  }
}

// The gate / up ECs added by the SwiGLU launch after a plain GEMM whose EC CTAs left g ⊙ z (CudaBackend::linear_swiglu,
// here up to 32 tokens) on the W4 package with random ECs on 60% of the linears: decode steps (eager, teacher-forced,
// then replayed graphs) against the same run with those ECs inside the GEMM launch, and against the CPU backend with the
// same compensators; the counter shows that the SwiGLU launches ran, in the captured steps too.
TEST(CudaBackend, SwigluEcMatchesInKernelAndCpu) {
  SPEAR_REQUIRE_GPU();
  constexpr int kSteps = 8;
  for (int seqs : {1, 3}) {
    std::vector<int32_t> ids;
    std::vector<float> logits[2];
    for (bool on : {false, true}) {
      cuda::CudaBackend gpu;
      gpu.set_ec_swiglu(on ? 32 : 0);
      gpu.set_ec_defer(false);  // off: every EC in its GEMM launch
      auto m = Model::load(w4_package(), gpu);
      gpu.set_ec_path(EcPath::Fused);
      attach_random_compensators(*m, 0.6, 16, 8, 4321);
      logits[on] = teacher_forced_logits(*m, seqs, kSteps, ids);
      const size_t eager = gpu.ec_swiglu_launches();
      greedy_graph_tokens(*m, seqs, kSteps);
      if (on) {
        EXPECT_GE(eager, size_t(kSteps)) << seqs << " sequences: no SwiGLU EC launch ran";
        EXPECT_GT(gpu.ec_swiglu_launches(), eager) << seqs << " sequences: not in the captured steps";
      } else {
        EXPECT_EQ(gpu.ec_swiglu_launches(), 0u);
      }
    }
    expect_in_kernel_and_cpu("SwiGLU EC", seqs, kSteps, ids, logits[0], logits[1]);
  }
}

// The decode-step fusions (the residual add in the W4 kernels' epilogue, the norm and SwiGLU tails inside their
// launches), all on, give the op-by-op logits bit for bit: the same plans, the same roundings (teacher-forced eager
// steps), and the same greedy tokens from replayed decode graphs. Also with fused compensators on 60% of the
// linears: their launches keep the fusions (the EC's term, then the residual add and the tails).
TEST(CudaBackend, DecodeFusionMatchesOpByOp) {
  SPEAR_REQUIRE_GPU();
  constexpr int kSteps = 8;
  struct Launches {
    size_t fused = 0, fused_ec = 0;
  };
  auto run = [](bool fused, bool ecs, int seqs, std::vector<int32_t>& ids, Launches* launches,
                std::vector<int32_t>* greedy) {
    cuda::CudaBackend gpu;
    gpu.set_decode_fusion(fused ? 7 : 0, 8);
    gpu.set_ec_defer(false);  // the fused down launch adds its EC in-kernel: the op-by-op steps must do so too
    gpu.set_ec_swiglu(0);  // likewise the gate / up pair (the fused launch keeps its EC in-kernel with the tail)
    auto m = Model::load(w4_package(), gpu);
    if (ecs) {
      gpu.set_ec_path(EcPath::Fused);
      attach_random_compensators(*m, 0.6, 8, 4, 4321);
    }
    std::vector<float> all = teacher_forced_logits(*m, seqs, kSteps, ids);
    *greedy = greedy_graph_tokens(*m, seqs, kSteps);
    launches->fused = gpu.fused_linear_launches();
    launches->fused_ec = gpu.fused_ec_linear_launches();
    return all;
  };
  for (bool ecs : {false, true})
    for (int seqs : {1, 3}) {
      const std::string what = std::to_string(seqs) + " sequences" + (ecs ? ", fused ECs" : "");
      std::vector<int32_t> ids;
      Launches off, on;
      std::vector<int32_t> greedy_off, greedy_on;
      const std::vector<float> ref = run(false, ecs, seqs, ids, &off, &greedy_off);
      const std::vector<float> got = run(true, ecs, seqs, ids, &on, &greedy_on);
      EXPECT_EQ(greedy_on, greedy_off) << what << ": greedy tokens from decode graphs differ";
      EXPECT_EQ(off.fused, 0u);
      EXPECT_GE(on.fused, size_t(kSteps) * 3) << what << ": the fused launches did not run";  // 3 per layer, step
      if (ecs) {
        EXPECT_GE(on.fused_ec, size_t(kSteps)) << what << ": no fused launch carried a compensator";
      } else {
        EXPECT_EQ(on.fused_ec, 0u) << what;
      }
      ASSERT_EQ(got.size(), ref.size());
      size_t differ = 0;
      for (size_t i = 0; i < ref.size(); ++i) differ += got[i] != ref[i];
      EXPECT_EQ(differ, 0u) << what << ": logits differ from the op-by-op path";
    }
}

// RoPE, the KV append and decode attention as one launch (CudaBackend::rope_attention) against rope_kv_append and
// attention: identical teacher-forced logits and greedy tokens from replayed decode graphs, one and three sequences.
TEST(CudaBackend, RopeAttentionMatchesSeparateKernels) {
  SPEAR_REQUIRE_GPU();
  constexpr int kSteps = 6;
  auto run = [](bool fused, int seqs, std::vector<int32_t>& ids, size_t* launches, std::vector<int32_t>* greedy) {
    cuda::CudaBackend gpu;
    gpu.set_rope_attention(fused);
    auto m = Model::load(w4_package(), gpu);
    std::vector<float> all = teacher_forced_logits(*m, seqs, kSteps, ids);
    *greedy = greedy_graph_tokens(*m, seqs, kSteps);
    *launches = gpu.rope_attention_launches();
    return all;
  };
  for (int seqs : {1, 3}) {
    const std::string what = std::to_string(seqs) + " sequences";
    std::vector<int32_t> ids, greedy_off, greedy_on;
    size_t off = 0, on = 0;
    const std::vector<float> ref = run(false, seqs, ids, &off, &greedy_off);
    const std::vector<float> got = run(true, seqs, ids, &on, &greedy_on);
    EXPECT_EQ(off, 0u) << what;
    EXPECT_GE(on, size_t(kSteps)) << what << ": the fused launch did not run";
    EXPECT_EQ(greedy_on, greedy_off) << what << ": greedy tokens from decode graphs differ";
    ASSERT_EQ(got.size(), ref.size());
    size_t differ = 0;
    for (size_t i = 0; i < ref.size(); ++i) differ += got[i] != ref[i];
    EXPECT_EQ(differ, 0u) << what << ": logits differ from the separate kernels";
  }
}

}  // namespace spear
