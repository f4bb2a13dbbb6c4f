// The stage-2 trainer on the reference model with W4 RTN weights; the step throughput (printed, not asserted).
#include <chrono>
#include <cmath>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "quant/quantizer.h"
#include "spear/compensator.h"
#include "spear/train/train_decoder.h"
#include "spear/train/trainer.h"
#include "test_util.h"

namespace spear {
namespace {

struct RefSetup {
  TrainWeights fp, q;  // FP checkpoint; every linear W4 RTN per-channel
  std::vector<std::vector<int32_t>> seqs;
  std::vector<float> teacher;  // FP final hidden states of seqs
};

RefSetup make_setup(int n_seqs, int len, uint64_t seed) {
  RefSetup s;
  s.fp = load_train_weights(test::ref_model_dir());
  std::map<std::string, PackedQuantWeights> quantized;
  for (const TrainLayer& L : s.fp.layers)
    for (int k = 0; k < TrainLayer::kNumLinears; ++k) {
      const TrainLinear& lin = L.linear(k);
      quantized[lin.name] = pack_quantized(rtn_quantize(lin.w.data(), lin.out, lin.in, QuantParams{}));
    }
  s.q = load_train_weights(test::ref_model_dir(), quantized);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> tok(2, s.fp.cfg.vocab_size - 1);
  for (int i = 0; i < n_seqs; ++i) {
    s.seqs.emplace_back(size_t(len));
    s.seqs.back()[0] = 0;  // BOS
    for (int j = 1; j < len; ++j) s.seqs.back()[size_t(j)] = tok(rng);
  }
  TrainDecoder teacher(s.fp, {});
  teacher.forward_logits(s.seqs);
  s.teacher = teacher.final_hidden();
  return s;
}

// Rank-r static EC with A ~ N(0, 1/in), B = 0: starts as the plain quantized model.
Compensator fresh_ec(const TrainWeights& w, const std::string& module, int rank, uint64_t seed) {
  const TrainLinear* lin = w.find(module);
  Compensator c;
  c.module = module;
  c.resize(lin->in, lin->out, rank, 0);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f / std::sqrt(float(lin->in)));
  for (float& v : c.A) v = nd(rng);
  return c;
}

TEST(Trainer, GateAtInitIsExactlyTheStaticCompensator) {
  RefSetup s = make_setup(2, 32, 1);
  Compensator stat = fresh_ec(s.q, "model.layers.2.mlp.down_proj", 4, 3);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.f, 0.05f);
  for (float& v : stat.B) v = nd(rng);  // a non-zero correction
  Compensator gated = stat;
  gated.init_gate(16, 0.5f, 9);
  std::vector<EcGrads> gs, gg;
  TrainDecoder ds(s.q, {&stat}), dg(s.q, {&gated});
  const double ls = ds.loss_and_grad(s.seqs, s.teacher.data(), gs);
  const double lg = dg.loss_and_grad(s.seqs, s.teacher.data(), gg);
  EXPECT_EQ(ls, lg);
  EXPECT_EQ(gs[0].A, gg[0].A);
  EXPECT_EQ(gs[0].B, gg[0].B);
  // the gate's own gradient is live (W2 = 0, so dW1 = 0, but dW2 and db2 are not)
  EXPECT_GT(std::abs(*std::max_element(gg[0].b2.begin(), gg[0].b2.end(),
                                       [](float a, float b) { return std::abs(a) < std::abs(b); })), 0.f);
  // The compensator changes the loss (it is not a no-op) and the plain W4 model is worse than FP (loss > 0).
  TrainDecoder plain(s.q, {});
  EXPECT_NE(plain.loss(s.seqs, s.teacher.data()), ls);
  EXPECT_GT(ls, 1e-3);
}

TEST(Trainer, TwentyStepsReduceTheLoss) {
  RefSetup s = make_setup(2, 64, 2);
  Compensator a = fresh_ec(s.q, "model.layers.1.self_attn.o_proj", 4, 1);
  Compensator b = fresh_ec(s.q, "model.layers.4.mlp.down_proj", 4, 2);
  b.init_gate(8, 0.1f, 3);
  TrainOptions o;
  o.steps = 20;
  o.batch_seqs = 2;
  o.lr = 5e-3f;
  o.warmup = 2;
  int calls = 0;
  o.on_step = [&](int step, double loss) {
    EXPECT_EQ(step, calls++);
    EXPECT_TRUE(std::isfinite(loss));
  };
  TrainReport r = train_compensators(s.q, {&a, &b}, s.seqs, s.teacher, o);
  EXPECT_EQ(calls, 20);
  ASSERT_EQ(r.loss_per_step.size(), 20u);
  EXPECT_NEAR(r.loss_per_step[0], r.initial_loss, 1e-6 * r.initial_loss);  // batch = all sequences here
  EXPECT_LT(r.final_loss, 0.97 * r.initial_loss) << "initial " << r.initial_loss << " final " << r.final_loss;
  EXPECT_GT(r.tokens_per_second, 0);
  std::printf("[ trainer  ] loss %.5f -> %.5f in 20 steps of 2x64 tokens, %.0f tokens/s\n", r.initial_loss,
              r.final_loss, r.tokens_per_second);
}

TEST(Trainer, ScheduleAndValidation) {
  TrainOptions o;
  o.steps = 100;
  o.warmup = 10;
  EXPECT_FLOAT_EQ(scheduled_lr(o, 1.f, 0), 0.1f);
  EXPECT_FLOAT_EQ(scheduled_lr(o, 1.f, 9), 1.f);
  EXPECT_FLOAT_EQ(scheduled_lr(o, 1.f, 10), 1.f);
  EXPECT_NEAR(scheduled_lr(o, 1.f, 55), 0.5f, 1e-6);
  EXPECT_NEAR(scheduled_lr(o, 1.f, 99), 0.f, 1e-3);
  o.schedule = "constant";
  EXPECT_FLOAT_EQ(scheduled_lr(o, 1.f, 99), 1.f);
  TrainWeights w = load_train_weights(test::fixture_dir("models/qwen2-tiny"));
  Compensator c;
  c.module = "model.layers.0.mlp.up_proj";
  c.resize(64, 160, 2, 0);
  std::vector<std::vector<int32_t>> seqs = {{1, 2, 3}, {4, 5}};
  EXPECT_SPEAR_ERROR(train_compensators(w, {&c}, seqs, std::vector<float>(5 * 64), TrainOptions{}), "all must be equal");
  seqs[1].push_back(6);
  EXPECT_SPEAR_ERROR(train_compensators(w, {&c}, seqs, std::vector<float>(5 * 64), TrainOptions{}), "teacher_hidden");
}

// Step throughput at the calibration shape: 4 sequences x 512 tokens, ECs down to layer 0 (the backward runs
// through every layer), student forward + backward + teacher logits. Printed, not asserted.
TEST(Trainer, StepThroughputOnRefModel) {
  RefSetup s = make_setup(4, 512, 3);
  std::vector<Compensator> ecs;
  const char* mods[] = {"model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj",
                        "model.layers.3.self_attn.o_proj", "model.layers.5.mlp.up_proj"};
  for (int i = 0; i < 4; ++i) {
    ecs.push_back(fresh_ec(s.q, mods[i], 16, uint64_t(i)));
    ecs.back().init_gate(16, 0.1f, uint64_t(i));
  }
  std::vector<Compensator*> ptrs;
  for (auto& e : ecs) ptrs.push_back(&e);
  TrainDecoder dec(s.q, ptrs);
  std::vector<EcGrads> g;
  dec.loss_and_grad(s.seqs, s.teacher.data(), g);  // warm-up (allocations)
  const int reps = 2;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) dec.loss_and_grad(s.seqs, s.teacher.data(), g);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  std::printf("[ trainer  ] step of 4x512 tokens (forward + backward to layer 0 + teacher logits): %.3f s, %.0f tokens/s\n",
              sec, 2048 / sec);
}

}  // namespace
}  // namespace spear
