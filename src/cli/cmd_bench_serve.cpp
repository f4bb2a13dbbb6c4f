// spear bench serve: a load generator for the OpenAI-compatible server, in the layout of the familiar serving
// benchmarks. Requests arrive as a Poisson process at --rate (or all at once), at most --concurrency in flight;
// each streams a completion of a prompt cut from --data at a random offset, with prompt and output lengths drawn
// uniformly from [--prompt-min, --prompt-max] and [--out-min, --out-max] tokens (ignore EOS is not available
// through the API, so a request may stop early). With --disconnect P a client leaves after a random number of
// chunks with probability P. Against --url (a running server) or -m (an in-process server on a free port,
// which also lets the run check that every request ended and every KV block came back, and report the
// process's memory after each of --repeat runs).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "core/error.h"
#include "serve/server.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

namespace {

using clk = std::chrono::steady_clock;
using nlohmann::json;

struct LoadOptions {
  std::string url, data, out, model_name, tokenizer;
  double rate = 0;  // requests/s; 0 = all at once
  int requests = 200, concurrency = 64, prompt_min = 32, prompt_max = 256, out_min = 16, out_max = 128;
  double disconnect = 0, slo_ttft_ms = 0, slo_itl_ms = 0;
  int repeat = 1;
  uint64_t seed = 0;
};

struct Sample {
  bool ok = false, left = false;
  int status = 0, out_tokens = 0;
  std::string stream_error;  // an error event inside a 200 stream (the request failed after it started)
  double ttft = 0, e2e = 0;
  std::vector<double> itl;        // between text events
  std::vector<double> itl_token;  // per token: an event's gap split evenly over the tokens it carries
};

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

long rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// One streaming request; fills s. Runs on its own thread.
void one_request(const std::string& url, const std::string& model, const std::string& prompt,
                 int max_tokens, int leave_after, Sample& s) {
  httplib::Client c(url);
  c.set_read_timeout(600, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = json{{"model", model}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0},
                  {"stream", true}, {"stream_options", {{"include_usage", true}, {"continuous_usage_stats", true}}}}
                 .dump(-1, ' ', false, json::error_handler_t::replace);  // windows may cut a character
  const auto t0 = clk::now();
  auto last = t0;
  int chunks = 0, tokens_seen = 0;
  std::string buf;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    buf.append(data, n);
    for (size_t end; (end = buf.find("\n\n")) != std::string::npos; buf.erase(0, end + 2)) {
      const std::string ev = buf.substr(0, end);
      if (ev.rfind("data: {", 0) != 0) continue;
      const json j = json::parse(ev.substr(6), nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("error") && s.stream_error.empty())
        s.stream_error = j["error"].is_object() ? j["error"].value("message", std::string("error")) : "error";
      // Tokens so far: the usage in every chunk (stream_options.continuous_usage_stats), else one per event.
      int tokens = tokens_seen + 1;
      if (j.contains("usage") && j["usage"].is_object()) {
        s.out_tokens = j["usage"].value("completion_tokens", 0);
        tokens = s.out_tokens;
      }
      if (!j.contains("choices") || j["choices"].empty() || j["choices"][0].value("text", "").empty()) continue;
      const auto now = clk::now();
      if (chunks == 0) {
        s.ttft = std::chrono::duration<double>(now - t0).count();
      } else {
        const double gap = std::chrono::duration<double>(now - last).count();
        s.itl.push_back(gap);
        const int n = std::max(1, tokens - tokens_seen);
        for (int i = 0; i < n; ++i) s.itl_token.push_back(gap / n);
      }
      tokens_seen = std::max(tokens_seen + 1, tokens);
      last = now;
      if (++chunks >= leave_after) {
        s.left = true;
        return false;
      }
    }
    return true;
  };
  auto res = c.send(req);
  s.e2e = std::chrono::duration<double>(clk::now() - t0).count();
  if (s.left) return;
  s.status = res ? res->status : -int(res.error());  // negative: httplib::Error (no response)
  s.ok = res && res->status == 200 && s.stream_error.empty();
  if (res && res->status == 200 && !s.stream_error.empty()) s.status = 200;  // counted as "200 + error event"
}

// The prompt texts: windows of the data file at random offsets, cut to a random token length.
std::vector<std::pair<std::string, int>> make_workload(const LoadOptions& o, const Tokenizer& tok) {
  std::string text;
  if (!o.data.empty()) text = read_text_file(o.data);
  std::mt19937_64 rng(o.seed);
  std::vector<int32_t> ids = text.empty() ? std::vector<int32_t>() : tok.encode(text, false);
  if (ids.size() < size_t(o.prompt_max) + 1) {  // no data: random ids over the vocabulary
    std::uniform_int_distribution<int32_t> v(0, tok.vocab_size() - 1);
    ids.resize(size_t(o.prompt_max) * 64);
    for (auto& t : ids) t = v(rng);
  }
  std::uniform_int_distribution<int> plen(o.prompt_min, o.prompt_max), olen(o.out_min, o.out_max);
  std::vector<std::pair<std::string, int>> w;
  for (int i = 0; i < o.requests; ++i) {
    const int n = plen(rng);
    std::uniform_int_distribution<size_t> off(0, ids.size() - size_t(n));
    const size_t at = off(rng);
    w.emplace_back(tok.decode(std::span<const int32_t>(ids.data() + at, size_t(n)), true), olen(rng));
  }
  return w;
}

json run_load(const LoadOptions& o, const std::string& url, const std::string& model,
              const std::vector<std::pair<std::string, int>>& work) {
  std::mt19937_64 rng(o.seed + 1);
  std::exponential_distribution<double> gap(o.rate > 0 ? o.rate : 1.0);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<Sample> samples(work.size());
  std::vector<int> leave(work.size(), 1 << 30);
  for (size_t i = 0; i < work.size(); ++i)
    if (u(rng) < o.disconnect) leave[i] = 1 + int(u(rng) * std::max(1, work[i].second));
  std::vector<std::thread> threads;
  std::atomic<int> in_flight{0};
  const auto t0 = clk::now();
  double next = 0;
  for (size_t i = 0; i < work.size(); ++i) {
    if (o.rate > 0) {
      next += gap(rng);
      std::this_thread::sleep_until(t0 + std::chrono::duration<double>(next));
    }
    while (in_flight.load() >= o.concurrency) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ++in_flight;
    threads.emplace_back([&, i] {
      one_request(url, model, work[i].first, work[i].second, leave[i], samples[i]);
      --in_flight;
    });
  }
  for (auto& t : threads) t.join();
  const double dur = std::chrono::duration<double>(clk::now() - t0).count();
  std::vector<double> ttft, tpot, itl, itl_token, e2e;
  int ok = 0, left = 0, failed = 0, good = 0;
  long out_tokens = 0, text_chunks = 0;
  std::map<int, int> statuses;
  std::string first_error;
  for (const Sample& s : samples) {
    if (first_error.empty() && !s.stream_error.empty()) first_error = s.stream_error;
    if (s.left) {
      ++left;
      continue;
    }
    if (!s.ok) {
      ++failed;
      ++statuses[s.status];
      continue;
    }
    ++ok;
    out_tokens += s.out_tokens;
    text_chunks += 1 + long(s.itl.size());
    ttft.push_back(s.ttft * 1e3);
    e2e.push_back(s.e2e * 1e3);
    for (double x : s.itl) itl.push_back(x * 1e3);
    for (double x : s.itl_token) itl_token.push_back(x * 1e3);
    const double t = s.out_tokens > 1 ? (s.e2e - s.ttft) * 1e3 / (s.out_tokens - 1) : 0;
    tpot.push_back(t);
    std::vector<double> mine;
    for (double x : s.itl) mine.push_back(x * 1e3);
    const bool meets = (o.slo_ttft_ms <= 0 || s.ttft * 1e3 <= o.slo_ttft_ms) &&
                       (o.slo_itl_ms <= 0 || pct(mine, 0.99) <= o.slo_itl_ms);
    good += meets;
  }
  auto stats = [](const std::vector<double>& v) {
    double mean = 0;
    for (double x : v) mean += x;
    mean = v.empty() ? 0 : mean / double(v.size());
    return json{{"mean", mean}, {"p50", pct(v, 0.5)}, {"p90", pct(v, 0.9)}, {"p99", pct(v, 0.99)}};
  };
  json st = json::object();
  for (auto [k, n] : statuses) st[std::to_string(k)] = n;
  return {{"requests", int(work.size())}, {"completed", ok}, {"disconnected", left}, {"failed", failed},
          {"failed_by_status", st}, {"duration_s", dur}, {"request_throughput", ok / dur},
          {"output_token_throughput", double(out_tokens) / dur}, {"output_tokens", out_tokens},
          {"goodput_rps", good / dur}, {"ttft_ms", stats(ttft)}, {"tpot_ms", stats(tpot)}, {"itl_ms", stats(itl)},
          {"itl_token_ms", stats(itl_token)}, {"itl_samples", itl.size()}, {"itl_token_samples", itl_token.size()},
          {"e2e_ms", stats(e2e)}, {"first_stream_error", first_error},
          // ITL is timed between stream events that carry text (as in vLLM's benchmark); a token whose text the
          // server holds back (an incomplete UTF-8 sequence, a possible stop string) joins the next event, whose
          // ITL then spans two iterations. Tokens per text event > 1 shows how often. ITL per token splits each
          // event's gap evenly over the tokens it carries (as SGLang's benchmark does), from the usage the server
          // sends in every chunk.
          {"text_events", text_chunks},
          {"tokens_per_text_event", text_chunks > 0 ? double(out_tokens) / double(text_chunks) : 0.0}};
}

void print_report(const json& r, const LoadOptions& o) {
  auto line = [](const char* k, const std::string& v) { std::printf("%-40s %s\n", k, v.c_str()); };
  auto f = [](double x) { return fmt::format("{:.2f}", x); };
  std::printf("============ Serving Benchmark Result ============\n");
  line("Requests (completed/disconnected/failed):", fmt::format("{} / {} / {}", r["completed"].get<int>(),
                                                                 r["disconnected"].get<int>(), r["failed"].get<int>()));
  if (!r["first_stream_error"].get<std::string>().empty())
    line("First error inside a stream:", r["first_stream_error"].get<std::string>());
  line("Benchmark duration (s):", f(r["duration_s"]));
  line("Total generated tokens:", std::to_string(r["output_tokens"].get<long>()));
  line("Request throughput (req/s):", f(r["request_throughput"]));
  line("Output token throughput (tok/s):", f(r["output_token_throughput"]));
  line("Tokens per text event (ITL spans):", f(r["tokens_per_text_event"]));
  if (o.slo_ttft_ms > 0 || o.slo_itl_ms > 0) line("Goodput under the SLO (req/s):", f(r["goodput_rps"]));
  for (const char* k : {"ttft_ms", "tpot_ms", "itl_ms", "itl_token_ms", "e2e_ms"}) {
    std::printf("---------------- %s ----------------\n", k);
    for (const char* p : {"mean", "p50", "p90", "p99"})
      line(fmt::format("  {} {} (ms):", p, k).c_str(), f(r[k][p]));
  }
  std::printf("==================================================\n");
}

}  // namespace

void register_bench_serve(CLI::App* bench) {
  auto o = std::make_shared<CommonOptions>();
  auto lo = std::make_shared<LoadOptions>();
  auto so = std::make_shared<serve::ServerOptions>();
  CLI::App* cmd = bench->add_subcommand(
      "serve", "Load generator for the OpenAI-compatible server: Poisson arrivals of streaming completions; TTFT, "
               "TPOT, ITL between text events and per token (p50/p90/p99), throughput and goodput. Against --url, "
               "or an in-process server (-m)");
  cmd->add_option("--model,-m", o->model_dir, "Serve this model in-process (on a free port) and load it")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--url", lo->url, "A running server instead, e.g. http://127.0.0.1:8000");
  cmd->add_option("--model-name", lo->model_name, "The model name to send (default: the server's first model)");
  cmd->add_option("--tokenizer", lo->tokenizer, "With --url: a directory with the model's tokenizer.json")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--data", lo->data, "Text the prompts are cut from (default: random tokens)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--rate", lo->rate, "Arrival rate in requests/s, Poisson (0: all at once)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--requests,-n", lo->requests, "Requests in one run")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--concurrency", lo->concurrency, "Requests in flight at most")->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--prompt-min", lo->prompt_min, "Shortest prompt, tokens")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--prompt-max", lo->prompt_max, "Longest prompt, tokens")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--out-min", lo->out_min, "Fewest output tokens asked for")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--out-max", lo->out_max, "Most output tokens asked for")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--disconnect", lo->disconnect, "Probability that a client leaves mid-stream")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--slo-ttft-ms", lo->slo_ttft_ms, "TTFT bound for goodput (0: none)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--slo-itl-ms", lo->slo_itl_ms, "p99 ITL bound per request for goodput (0: none)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--repeat", lo->repeat, "Runs of the same load (the report shows memory after each)")
      ->check(CLI::Range(1, 1000));
  cmd->add_option("--seed", lo->seed, "Workload seed");
  cmd->add_option("--out", lo->out, "Write the results as JSON to this file");
  cmd->add_option("--max-running", so->engine.max_running, "In-process server: KV slots")->check(CLI::Range(1, 4096));
  cmd->add_option("--max-context", so->engine.max_context, "In-process server: tokens per request")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--chunk", so->engine.chunk, "In-process server: prompt tokens per iteration")
      ->check(CLI::Range(1, 1 << 20));
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    if (o->model_dir.empty() == lo->url.empty()) throw CLI::ValidationError("give either -m MODEL or --url URL");
    if (lo->prompt_min > lo->prompt_max || lo->out_min > lo->out_max)
      throw CLI::ValidationError("--prompt-min/--out-min must not exceed the maxima");
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Model> model;
    std::unique_ptr<Tokenizer> server_tok;
    std::unique_ptr<serve::Server> server;  // destroyed before what it serves
    std::thread http;
    std::string url = lo->url, name = lo->model_name, tok_dir = o->model_dir.empty() ? lo->tokenizer : o->model_dir;
    if (!o->model_dir.empty()) {
      serve::ServerOptions sopt = *so;
      sopt.port = 0;
      sopt.model_name = name.empty() ? "bench" : name;
      sopt.max_connections = std::max(sopt.max_connections, lo->concurrency + 16);
      sopt.engine.max_waiting = std::max(sopt.engine.max_waiting, lo->requests);
      name = sopt.model_name;
      server = std::make_unique<serve::Server>(sopt);
      url = "http://127.0.0.1:" + std::to_string(server->bind());
      http = std::thread([&] { server->run(); });
      backend = make_backend(*o);
      backend->set_prefill_graphs(false);  // as spear serve
      model = Model::load(o->model_dir, *backend);
      server_tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(o->model_dir));
      server->attach(*model, *server_tok);
    } else {
      httplib::Client probe(lo->url);
      auto m = probe.Get("/v1/models");
      if (!m || m->status != 200) fail("--url {}: GET /v1/models failed", lo->url);
      if (name.empty()) name = json::parse(m->body)["data"][0]["id"].get<std::string>();
    }
    if (tok_dir.empty()) fail("--url: the workload needs the model's tokenizer: give --tokenizer DIR");
    const Tokenizer tok = Tokenizer::from_dir(tok_dir);
    const auto work = make_workload(*lo, tok);
    json runs = json::array();
    for (int rep = 0; rep < lo->repeat; ++rep) {
      json r = run_load(*lo, url, name, work);
      if (server) {  // every request ended and the KV cache is empty again
        for (int i = 0; i < 500 && !(server->engine()->idle() && server->engine()->stats().kv_blocks_used == 0); ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        const EngineStats st = server->engine()->stats();
        r["server"] = {{"idle", server->engine()->idle()}, {"kv_blocks_used", st.kv_blocks_used},
                       {"finished", st.finished}, {"preemptions", st.preemptions}, {"rss_mb", rss_kb() / 1024.0}};
      }
      if (!o->json) {
        std::printf("run %d of %d\n", rep + 1, lo->repeat);
        print_report(r, *lo);
        if (server)
          std::printf("server: idle %s, KV blocks in use %d, requests finished %llu, RSS %.1f MB\n",
                      r["server"]["idle"].get<bool>() ? "yes" : "no", r["server"]["kv_blocks_used"].get<int>(),
                      (unsigned long long)r["server"]["finished"].get<uint64_t>(), r["server"]["rss_mb"].get<double>());
      }
      runs.push_back(r);
    }
    json doc = {{"rate", lo->rate}, {"requests", lo->requests}, {"concurrency", lo->concurrency},
                {"prompt_tokens", {lo->prompt_min, lo->prompt_max}}, {"output_tokens", {lo->out_min, lo->out_max}},
                {"disconnect", lo->disconnect}, {"device", o->device}, {"runs", runs}};
    if (!lo->out.empty()) {
      std::ofstream f(lo->out);
      if (!f) fail("cannot write {}", lo->out);
      f << doc.dump(2) << "\n";
    }
    if (o->json) std::printf("%s\n", doc.dump().c_str());
    if (server) {
      server->stop();
      http.join();
    }
  });
}

}  // namespace spear::cli
