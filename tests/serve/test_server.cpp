// `spear serve` end to end over HTTP (cpp-httplib client) on the bundled model, CPU: greedy completions equal
// one-at-a-time generation, streaming equals non-streaming and follows the SSE format, bad requests get
// 4xx envelopes, clients that disconnect mid-stream free their KV blocks, concurrent streams all finish, and
// shutdown ends every accepted request.
#include <atomic>
#include <random>
#include <thread>

#include <omp.h>

#include <gtest/gtest.h>
#include <httplib.h>

#include "backend/cpu/cpu_backend.h"
#include "runtime/generator.h"
#include "serve/server.h"
#include "ref_model_suite.h"
#include "test_util.h"

namespace spear::serve {

namespace {

using nlohmann::json;

class ServerTest : public test::RefModelSuite {
 protected:
  void start(ServerOptions o = {}) {
    o.port = 0;
    o.model_name = "ref";
    if (o.engine.max_context == 0) o.engine.max_context = 256;
    server_ = std::make_unique<Server>(o);
    port_ = server_->bind();
    http_ = std::thread([this] { server_->run(); });
    server_->attach(*model_, *tok_);
  }
  void TearDown() override {
    if (server_) {
      server_->stop();
      http_.join();
      server_.reset();
    }
  }
  httplib::Client client() {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(60, 0);
    return c;
  }
  // Waits until the engine is idle with every KV block back (requests end one iteration after a cancel).
  void expect_drained() {
    for (int i = 0; i < 200 && !(server_->engine()->idle() && server_->engine()->stats().kv_blocks_used == 0); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(server_->engine()->idle());
    EXPECT_EQ(server_->engine()->stats().kv_blocks_used, 0);
  }
  static std::vector<json> sse_events(const std::string& body, bool* done) {
    std::vector<json> out;
    *done = false;
    size_t pos = 0;
    while (pos < body.size()) {
      const size_t end = body.find("\n\n", pos);
      EXPECT_NE(end, std::string::npos) << "event not terminated by a blank line";
      if (end == std::string::npos) break;
      const std::string ev = body.substr(pos, end - pos);
      EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
      EXPECT_FALSE(*done) << "event after [DONE]";
      if (ev == "data: [DONE]")
        *done = true;
      else
        out.push_back(json::parse(ev.substr(6)));
      pos = end + 2;
    }
    return out;
  }
  // POSTs a streaming request; its events, once the stream ended with data: [DONE] (empty on any failure).
  static std::vector<json> stream(httplib::Client& c, const std::string& path, const json& body) {
    auto s = c.Post(path, body.dump(), "application/json");
    EXPECT_TRUE(s) << path;
    if (!s) return {};
    EXPECT_EQ(s->status, 200) << s->body;
    bool done = false;
    std::vector<json> ev = sse_events(s->body, &done);
    EXPECT_TRUE(done) << "no data: [DONE]";
    return s->status == 200 && done ? ev : std::vector<json>{};
  }
  std::unique_ptr<Server> server_;
  std::thread http_;
  int port_ = 0;
};

}  // namespace

TEST_F(ServerTest, HealthModelsAndMetrics) {
  start();
  auto c = client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "ref");
  auto x = c.Get("/metrics");
  ASSERT_TRUE(x);
  EXPECT_NE(x->body.find("spear_requests_running 0"), std::string::npos);
  EXPECT_NE(x->body.find("# TYPE spear_time_to_first_token_seconds histogram"), std::string::npos);
}

// The engine thread computes with the OpenMP thread count of the thread that attached the model (spear serve
// --threads), not the process default that a new std::thread starts with.
TEST_F(ServerTest, EngineThreadKeepsTheComputeThreadCount) {
  const int before = omp_get_max_threads();
  const int want = before + 1;  // differs from the default a new thread would get
  omp_set_num_threads(want);
  start();
  auto c = client();
  auto r = c.Post("/v1/completions", json{{"prompt", "The cat"}, {"max_tokens", 2}, {"temperature", 0}}.dump(),
                  "application/json");
  omp_set_num_threads(before);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(server_->engine()->stats().compute_threads, want);
  auto x = c.Get("/metrics");
  ASSERT_TRUE(x);
  EXPECT_NE(x->body.find("spear_compute_threads " + std::to_string(want)), std::string::npos);
}

TEST_F(ServerTest, HealthIs503BeforeTheModelIsAttached) {
  ServerOptions o;
  o.port = 0;
  o.model_name = "ref";
  Server s(o);
  const int port = s.bind();
  std::thread t([&] { s.run(); });
  httplib::Client c("127.0.0.1", port);
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 503);
  auto r = c.Post("/v1/completions", R"({"prompt":"x"})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  s.stop();
  t.join();
}

TEST_F(ServerTest, GreedyCompletionEqualsGenerateAndStreamingEqualsWhole) {
  start();
  auto c = client();
  const std::string prompt = "The little robot";
  auto r = c.Post("/v1/completions", json{{"prompt", prompt}, {"max_tokens", 24}}.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  const auto ref = generate(*model_, tok_->encode(prompt, true), 24, SamplingParams{}, tok_->eos_ids());
  std::vector<int32_t> ids = ref.output_ids;
  if (ref.finish_reason == "stop") ids.pop_back();  // the EOS token is not text
  EXPECT_EQ(j["choices"][0]["text"], tok_->decode(ids, true));
  EXPECT_EQ(j["choices"][0]["finish_reason"], ref.finish_reason);
  EXPECT_EQ(j["usage"]["completion_tokens"], int(ref.output_ids.size()));
  EXPECT_EQ(j["object"], "text_completion");

  auto s = c.Post("/v1/completions", json{{"prompt", prompt}, {"max_tokens", 24}, {"stream", true}}.dump(),
                  "application/json");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->status, 200);
  EXPECT_NE(s->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
  bool done = false;
  const auto events = sse_events(s->body, &done);
  EXPECT_TRUE(done) << "no data: [DONE]";
  std::string text;
  int finals = 0;
  for (const json& e : events) {
    EXPECT_EQ(e["object"], "text_completion");
    EXPECT_EQ(e["id"], events[0]["id"]);
    text += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) ++finals;
  }
  EXPECT_EQ(finals, 1);
  EXPECT_EQ(text, j["choices"][0]["text"]);
  expect_drained();
}

TEST_F(ServerTest, ChatStreamsRoleFirstAndUsageLast) {
  start();
  auto c = client();
  const json body = {{"messages", {{{"role", "user"}, {"content", "Tell me a story."}}}},
                     {"max_tokens", 10},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
  const auto ev = stream(c, "/v1/chat/completions", body);
  ASSERT_GE(ev.size(), 3u);
  EXPECT_EQ(ev[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(ev[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(ev.back()["choices"].empty());
  EXPECT_EQ(ev.back()["usage"]["completion_tokens"], 10);
  auto w = c.Post("/v1/chat/completions", json{{"messages", body["messages"]}, {"max_tokens", 10}}.dump(),
                  "application/json");
  ASSERT_TRUE(w);
  const json j = json::parse(w->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  std::string streamed;
  for (const json& e : ev)
    if (!e["choices"].empty() && e["choices"][0]["delta"].contains("content"))
      streamed += e["choices"][0]["delta"]["content"].get<std::string>();
  EXPECT_EQ(streamed, j["choices"][0]["message"]["content"]);
}

// stream_options.continuous_usage_stats: every chunk carries the usage so far (completion tokens never decrease and
// end at the final usage's count); without it only the last chunk does.
TEST_F(ServerTest, ContinuousUsageInEveryChunk) {
  start();
  auto c = client();
  for (const bool every : {true, false}) {
    const json body = {{"prompt", "Once upon a time"},
                       {"max_tokens", 12},
                       {"temperature", 0},
                       {"stream", true},
                       {"stream_options", {{"include_usage", true}, {"continuous_usage_stats", every}}}};
    const auto ev = stream(c, "/v1/completions", body);
    ASSERT_GE(ev.size(), 3u);
    int last = 0;
    for (size_t i = 0; i + 1 < ev.size(); ++i) {  // the content chunks and the finish chunk
      ASSERT_EQ(ev[i]["choices"].size(), 1u) << i;
      if (!every) {
        EXPECT_FALSE(ev[i].contains("usage")) << i;
        continue;
      }
      ASSERT_TRUE(ev[i].contains("usage")) << i;
      const int ct = ev[i]["usage"]["completion_tokens"].get<int>();
      EXPECT_GE(ct, std::max(last, 1)) << i;
      EXPECT_EQ(ev[i]["usage"]["total_tokens"].get<int>(), ev[i]["usage"]["prompt_tokens"].get<int>() + ct) << i;
      last = ct;
    }
    EXPECT_TRUE(ev.back()["choices"].empty());
    const int total = ev.back()["usage"]["completion_tokens"].get<int>();
    EXPECT_GE(total, 1);
    EXPECT_LE(total, 12);
    if (every) {
      EXPECT_EQ(last, total);
    }
  }
  expect_drained();
}

TEST_F(ServerTest, BadRequestsGetErrorEnvelopes) {
  ServerOptions o;
  o.max_body_bytes = 64 * 1024;
  start(o);
  auto c = client();
  struct Case {
    std::string path, body;
    int status;
  };
  const std::string long_prompt(20000, 'z');  // far more than 256 tokens of context
  const Case cases[] = {
      {"/v1/completions", "{not json", 400},
      {"/v1/completions", R"({"prompt":"x","max_tokens":"ten"})", 400},
      {"/v1/completions", R"({"prompt":"x","max_tokens":-5})", 400},
      {"/v1/completions", R"({"prompt":"x","model":"gpt-4"})", 404},
      {"/v1/completions", json{{"prompt", long_prompt}}.dump(), 400},
      {"/v1/completions", std::string(70 * 1024, ' '), 413},
      {"/v1/chat/completions", R"({"messages":"hi"})", 400},
      {"/v1/nothing", "{}", 404},
  };
  for (const Case& k : cases) {
    auto r = c.Post(k.path, k.body, "application/json");
    ASSERT_TRUE(r) << k.path;
    EXPECT_EQ(r->status, k.status) << k.body.substr(0, 60);
    const json j = json::parse(r->body, nullptr, false);
    EXPECT_TRUE(j.is_object() && j.contains("error") && j["error"]["message"].is_string()) << r->body;
  }
  // Huge max_tokens is clipped by the context, not refused.
  auto r = c.Post("/v1/completions", R"({"prompt":"x","max_tokens":1000000})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  expect_drained();
}

TEST_F(ServerTest, ClientsLeavingMidStreamFreeTheirBlocks) {
  ServerOptions o;
  o.engine.max_running = 4;
  start(o);
  std::atomic<int> completed{0}, left{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 12; ++i)
    ts.emplace_back([&, i] {
      httplib::Client c("127.0.0.1", port_);
      c.set_read_timeout(60, 0);
      const bool leave = i % 3 == 0;
      int chunks = 0;
      httplib::Request req;
      req.method = "POST";
      req.path = "/v1/completions";
      req.body = json{{"prompt", "Story " + std::to_string(i)}, {"max_tokens", 40}, {"stream", true},
                      {"stop", json::array()}}
                     .dump();
      req.set_header("Content-Type", "application/json");
      req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return !(leave && ++chunks >= 2); };
      auto res = c.send(req);
      if (leave)
        ++left;
      else if (res && res->status == 200)
        ++completed;
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(completed.load(), 8);
  EXPECT_EQ(left.load(), 4);
  expect_drained();
  auto c = client();
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->body.find("spear_requests_total{finish_reason=\"error\"} 0") != std::string::npos, true);
}

TEST_F(ServerTest, ShutdownEndsAcceptedRequests) {
  ServerOptions o;
  o.drain_seconds = 0;  // no time to finish: accepted requests end with an error response
  start(o);
  std::atomic<int> status{0};
  std::thread t([&] {
    auto c = client();
    auto r = c.Post("/v1/completions", R"({"prompt":"A long tale","max_tokens":200})", "application/json");
    status = r ? r->status : -1;
  });
  for (int i = 0; i < 200 && server_->engine()->stats().running == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  server_->stop();
  t.join();
  EXPECT_TRUE(status == 503 || status == 200) << status;  // an error envelope, or done before the stop
  EXPECT_EQ(server_->engine()->stats().kv_blocks_used, 0);
  http_.join();
  server_.reset();
}

}  // namespace spear::serve
