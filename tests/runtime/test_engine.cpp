// The continuous-batching engine on the bundled model (CPU): batched greedy outputs equal one-at-a-time
// generation, with chunked prefill, queueing, and preemption under a tiny KV budget; cancellation, stop strings,
// bad requests; every request ends exactly once and the KV blocks all come back.
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "runtime/engine.h"
#include "runtime/latency_table.h"
#include "runtime/generator.h"
#include "ref_model_suite.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace spear {

namespace {

struct Outcome {
  std::vector<int32_t> tokens;
  std::string text, reason;
  int finished_events = 0;
};

class EngineTest : public test::RefModelSuite {
 protected:
  static std::vector<std::vector<int32_t>> prompts(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> len(1, 40), tok(3, model_->config().vocab_size - 1);
    std::vector<std::vector<int32_t>> p(static_cast<size_t>(n));
    for (auto& v : p) {
      v.resize(size_t(len(rng)));
      for (auto& t : v) t = tok(rng);
    }
    return p;
  }
  // Runs every prompt through one engine; returns each request's tokens, text and finish reason.
  static std::vector<Outcome> run(Engine& eng, const std::vector<std::vector<int32_t>>& ps, int max_tokens,
                                  const std::vector<std::string>& stop = {}) {
    std::vector<Outcome> out(ps.size());
    std::map<uint64_t, size_t> index;
    for (size_t i = 0; i < ps.size(); ++i) {
      Request r;
      r.prompt = ps[i];
      r.max_tokens = max_tokens;
      r.stop = stop;
      const uint64_t id = eng.submit(r, [&out, &index](const RequestEvent& e) {
        Outcome& o = out[index.at(e.id)];
        EXPECT_EQ(o.finished_events, 0) << "event after the finished event";
        o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
        o.text += e.text;
        if (e.finished) {
          ++o.finished_events;
          o.reason = e.finish_reason;
        }
      });
      index[id] = i;
    }
    eng.run_until_idle();
    return out;
  }
  static std::vector<int32_t> alone(const std::vector<int32_t>& p, int max_tokens) {
    return generate(*model_, p, max_tokens, SamplingParams{}, {}).output_ids;
  }
  static TextStream::Decode decoder() {
    return [](std::span<const int32_t> ids) { return tok_->decode(ids); };
  }
};

}  // namespace

TEST_F(EngineTest, BatchedGreedyEqualsOneAtATime) {
  const auto ps = prompts(7, 1);
  EngineOptions o;
  o.max_running = 3;  // queueing: requests join as others leave
  o.chunk = 7;        // chunked prefill mixed with decode
  Engine eng(*model_, o);
  const auto got = run(eng, ps, 12);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(got[i].tokens, alone(ps[i], 12)) << "request " << i;
    EXPECT_EQ(got[i].reason, "length");
    EXPECT_EQ(got[i].finished_events, 1);
  }
  const EngineStats st = eng.stats();
  EXPECT_EQ(st.finished, ps.size());
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.running + st.waiting, 0);
  EXPECT_EQ(st.preemptions, 0u);
}

// warm_up (what spear serve runs on a GPU before it turns ready) leaves no trace: afterwards every request
// decodes exactly as alone, every block is free, and it refuses an engine with work.
TEST_F(EngineTest, WarmUpLeavesOutputsAndBlocksUnchanged) {
  const auto ps = prompts(5, 3);
  EngineOptions o;
  o.max_running = 4;
  o.max_context = 96;
  o.chunk = 9;
  Engine eng(*model_, o);
  EXPECT_GE(eng.warm_up(), 0.0);
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
  const auto got = run(eng, ps, 10);
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(got[i].tokens, alone(ps[i], 10)) << "request " << i;
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
  Request r;
  r.prompt = ps[0];
  r.max_tokens = 4;
  eng.submit(r, [](const RequestEvent&) {});
  eng.step();  // admitted and running
  EXPECT_THROW(eng.warm_up(), Error);
  eng.run_until_idle();
}

// Under an ITL SLO the engine accounts, for the iterations with decode tokens, the latency table's prediction
// of what it scheduled and the measured forward time, and counts those over the SLO. A generous SLO: none over;
// an impossible one: every such iteration over (prompts then wait until no request decodes, and still all
// finish). Only mixed iterations (prompt tokens beside decodes) calibrate the table. Outputs never change.
TEST_F(EngineTest, SloIterationsArePredictedMeasuredAndCounted) {
  const auto ps = prompts(4, 5);
  auto table = std::make_shared<LatencyTable>();
  table->tokens = {1, 64};
  table->ms = {0.5, 4.0};
  for (double slo : {1e6, 1e-6}) {
    EngineOptions o;
    o.max_running = 4;
    o.chunk = 16;
    o.slo_itl_ms = slo;
    o.latency = table;
    Engine eng(*model_, o);
    const auto got = run(eng, ps, 8);
    for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(got[i].tokens, alone(ps[i], 8)) << "request " << i;
    const EngineStats st = eng.stats();
    EXPECT_GT(st.slo_iterations, 0u) << "slo " << slo;
    EXPECT_LE(st.slo_iterations, st.iterations);
    EXPECT_GE(st.slo_predicted_ms, 0.5 * double(st.slo_iterations));  // at least the 1-token row each
    EXPECT_GT(st.slo_measured_ms, 0.0);
    EXPECT_EQ(st.slo_over, slo > 1 ? 0u : st.slo_iterations) << "slo " << slo;
    EXPECT_LE(st.slo_mixed_iterations, st.slo_iterations);
    EXPECT_LE(st.slo_mixed_over, st.slo_over);
    if (slo > 1) {
      // Prompts longer than the chunk prefill beside the first decodes; the calibration learns from those.
      EXPECT_GT(st.slo_mixed_iterations, 0u);
      EXPECT_GT(st.slo_mixed_measured_ms, 0.0);
      EXPECT_NE(st.slo_scale, 1.0) << "the calibration never moved";
    } else {
      // No prompt token fits beside a decode: no mixed iteration, nothing to calibrate on.
      EXPECT_EQ(st.slo_mixed_iterations, 0u);
      EXPECT_EQ(st.slo_scale, 1.0);
    }
    EXPECT_GE(st.slo_scale, 0.25);
    EXPECT_LE(st.slo_scale, 4.0);
  }
}

// EngineOptions::iteration_log: one JSON line per iteration; its prompt chunks and decode tokens add up to every
// token the requests put through the model.
TEST_F(EngineTest, IterationLogHasOneLinePerIteration) {
  const auto ps = prompts(3, 11);
  const std::string path = testing::TempDir() + "spear_iteration_log.jsonl";
  std::remove(path.c_str());
  EngineOptions o;
  o.max_running = 3;
  o.chunk = 7;
  o.iteration_log = path;
  std::vector<Outcome> got;
  uint64_t iterations = 0;
  {
    Engine eng(*model_, o);
    got = run(eng, ps, 5);
    iterations = eng.stats().iterations;
  }
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::string line;
  uint64_t lines = 0;
  long prompt_tokens = 0, decodes = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    ++lines;
    long chunks = 0;
    for (const auto& c : j.at("prompts")) {
      chunks += c.at(0).get<long>();
      EXPECT_GE(c.at(1).get<int>(), 0);
    }
    EXPECT_EQ(chunks, j.at("prompt_tokens").get<long>()) << line;
    EXPECT_LE(j.at("prompt_tokens").get<int>(), o.chunk) << line;
    EXPECT_GT(j.at("forward_ms").get<double>(), 0.0) << line;
    EXPECT_EQ(j.at("predicted_ms").get<double>(), -1.0) << "no SLO, no prediction: " << line;
    prompt_tokens += j.at("prompt_tokens").get<long>();
    decodes += j.at("decodes").get<long>();
  }
  EXPECT_EQ(lines, iterations);
  long want_prompt = 0, want_decodes = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    // The first token comes from the prefill's last chunk; a one-token prompt's prefill looks like a decode.
    const bool one = ps[i].size() == 1;
    want_prompt += one ? 0 : long(ps[i].size());
    want_decodes += long(got[i].tokens.size()) - 1 + (one ? 1 : 0);
  }
  // A prompt whose last chunk is a single token has it scheduled (and logged) like a decode token.
  EXPECT_EQ(prompt_tokens + decodes, want_prompt + want_decodes);
  EXPECT_LE(prompt_tokens, want_prompt);
  EXPECT_GE(prompt_tokens, want_prompt - long(ps.size()));
  std::remove(path.c_str());
}

TEST_F(EngineTest, PreemptionUnderATinyKvBudgetKeepsOutputs) {
  const auto ps = prompts(6, 2);
  EngineOptions o;
  o.max_running = 4;
  o.max_context = 64;
  o.kv_blocks = 5;  // one full request is 4 blocks: four running requests must take turns
  o.chunk = 16;
  Engine eng(*model_, o);
  const auto got = run(eng, ps, 20);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(got[i].tokens, alone(ps[i], 20)) << "request " << i;
    EXPECT_EQ(got[i].finished_events, 1);
  }
  EXPECT_GT(eng.stats().preemptions, 0u);
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
}

TEST_F(EngineTest, ContextLimitEndsWithLength) {
  EngineOptions o;
  o.max_context = 24;
  Engine eng(*model_, o);
  const auto got = run(eng, {std::vector<int32_t>(20, 5)}, 100);
  EXPECT_EQ(got[0].tokens.size(), 4u);  // 20 prompt + 4 = the context
  EXPECT_EQ(got[0].reason, "length");
}

TEST_F(EngineTest, CancelAbortsAndFreesBlocks) {
  Engine eng(*model_, EngineOptions{});
  std::vector<RequestEvent> events;
  Request r;
  r.prompt = prompts(1, 3)[0];
  r.max_tokens = 50;
  const uint64_t id = eng.submit(r, [&](const RequestEvent& e) { events.push_back(e); });
  Request r2 = r;
  const uint64_t id2 = eng.submit(r2, [&](const RequestEvent& e) { events.push_back(e); });
  eng.step();
  eng.step();
  eng.cancel(id);
  eng.cancel(id2);
  eng.cancel(12345);  // unknown ids are ignored
  eng.run_until_idle();
  int aborted = 0;
  for (const auto& e : events)
    if (e.finished) {
      EXPECT_EQ(e.finish_reason, "abort");
      ++aborted;
    }
  EXPECT_EQ(aborted, 2);
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
  EXPECT_TRUE(eng.idle());
}

TEST_F(EngineTest, StopStringEndsTextBeforeIt) {
  const std::vector<int32_t> p = tok_->encode("Once upon a time", true);
  Engine plain(*model_, EngineOptions{}, decoder());
  const auto full = run(plain, {p}, 30);
  ASSERT_GT(full[0].text.size(), 12u);
  EXPECT_EQ(full[0].text, tok_->decode(full[0].tokens));
  // A stop string taken from the middle of the greedy continuation.
  const std::string stop = full[0].text.substr(8, 4);
  const size_t at = full[0].text.find(stop);
  Engine eng(*model_, EngineOptions{}, decoder());
  const auto got = run(eng, {p}, 30, {stop});
  EXPECT_EQ(got[0].reason, "stop");
  EXPECT_EQ(got[0].text, full[0].text.substr(0, at));
  EXPECT_LT(got[0].tokens.size(), full[0].tokens.size());
}

TEST_F(EngineTest, EosStopsAndIgnoreEosGoesOn) {
  const auto p = prompts(1, 4)[0];
  const auto ref = alone(p, 10);
  Engine eng(*model_, EngineOptions{});
  Outcome o;
  Request r;
  r.prompt = p;
  r.max_tokens = 10;
  r.stop_ids = {ref[2]};  // pretend the third token is EOS
  eng.submit(r, [&](const RequestEvent& e) {
    o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
    if (e.finished) o.reason = e.finish_reason;
  });
  eng.run_until_idle();
  EXPECT_EQ(o.reason, "stop");
  EXPECT_EQ(o.tokens, std::vector<int32_t>(ref.begin(), ref.begin() + 3));
  r.ignore_eos = true;
  o = {};
  eng.submit(r, [&](const RequestEvent& e) {
    o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
    if (e.finished) o.reason = e.finish_reason;
  });
  eng.run_until_idle();
  EXPECT_EQ(o.reason, "length");
  EXPECT_EQ(o.tokens, ref);
}

TEST_F(EngineTest, BadRequestsAreRefusedAndZeroTokensFinishAtOnce) {
  EngineOptions o;
  o.max_context = 32;
  Engine eng(*model_, o);
  Request r;
  EXPECT_THROW(eng.submit(r, {}), Error);  // empty prompt
  r.prompt = std::vector<int32_t>(32, 5);
  EXPECT_THROW(eng.submit(r, {}), Error);  // no room left in the context
  r.prompt = {5, 6};
  r.max_tokens = -1;
  EXPECT_THROW(eng.submit(r, {}), Error);
  r.max_tokens = 3;
  r.prompt = {5, model_->config().vocab_size};
  EXPECT_THROW(eng.submit(r, {}), Error);  // token outside the vocabulary
  r.prompt = {5, 6};
  r.stop = {"x"};
  EXPECT_THROW(eng.submit(r, {}), Error);  // stop strings without a tokenizer
  r.stop.clear();
  r.max_tokens = 0;
  std::string reason;
  int events = 0;
  eng.submit(r, [&](const RequestEvent& e) {
    ++events;
    reason = e.finish_reason;
    EXPECT_TRUE(e.tokens.empty());
  });
  eng.run_until_idle();
  EXPECT_EQ(events, 1);
  EXPECT_EQ(reason, "length");
  EngineOptions bad;
  bad.max_context = 64;
  bad.kv_blocks = 3;  // cannot hold one full request
  EXPECT_THROW(Engine(*model_, bad), Error);
}

TEST_F(EngineTest, AbortAllEndsEveryRequestWithAnError) {
  Engine eng(*model_, EngineOptions{});
  int errors = 0;
  for (const auto& p : prompts(3, 5)) {
    Request r;
    r.prompt = p;
    r.max_tokens = 40;
    eng.submit(r, [&](const RequestEvent& e) {
      if (e.finished) {
        EXPECT_EQ(e.finish_reason, "error");
        EXPECT_EQ(e.error, "shutting down");
        ++errors;
      }
    });
  }
  eng.step();
  eng.close();
  eng.abort_all("shutting down");
  EXPECT_EQ(errors, 3);
  Request late;
  late.prompt = {5, 6};
  EXPECT_THROW(eng.submit(late, {}), Error);  // closed: refused, never left waiting
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
  EXPECT_TRUE(eng.idle());
}

}  // namespace spear
