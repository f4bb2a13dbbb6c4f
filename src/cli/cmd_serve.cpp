// spear serve: the OpenAI-compatible HTTP server (serve/server.h). The port opens first (/health answers 503
// while the model loads); SIGINT / SIGTERM shut it down gracefully: new requests get 503, accepted ones finish
// (up to --drain-seconds), then the rest end with an error.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <algorithm>
#include <thread>

#include <pthread.h>

#include "cli/common.h"
#include "runtime/latency_table.h"
#include "serve/server.h"
#include "spear/random_ec.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_serve(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto so = std::make_shared<serve::ServerOptions>();
  auto max_body_kb = std::make_shared<int>(1024);
  CLI::App* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, "
               "/health, /metrics; continuous batching over a KV cache accounted in 16-token blocks");
  add_model_option(cmd, *o);
  add_runtime_options(cmd, *o);
  add_tp_options(cmd, *o);
  cmd->add_option("--host", so->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", so->port, "Port to listen on (0: any free port, printed)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  cmd->add_option("--model-name", so->model_name, "Model name clients send (default: the model directory's name)");
  cmd->add_option("--max-running", so->engine.max_running, "Requests prefilling or decoding at once (KV slots)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--max-context", so->engine.max_context,
                  "Prompt + output tokens per request (0: the model's context length)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--kv-blocks", so->engine.kv_blocks,
                  "KV budget in 16-token blocks; beyond it the newest request is preempted and recomputed later "
                  "(0: max-running x max-context / 16)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--chunk", so->engine.chunk, "Prompt tokens per iteration (chunked prefill)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--max-waiting", so->engine.max_waiting, "Queued requests at most (beyond: HTTP 429)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--max-connections", so->max_connections, "HTTP worker threads (each streaming client holds one)")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  cmd->add_option("--max-body-kb", *max_body_kb, "Largest request body in KiB (beyond: HTTP 413)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  auto table_path = std::make_shared<std::string>();
  cmd->add_option("--slo-itl-ms", so->engine.slo_itl_ms,
                  "Inter-token latency SLO: each iteration's prompt chunk is the largest (<= --chunk) whose predicted "
                  "time with the iteration's decode tokens meets it (0: fixed --chunk)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--slo-quantile", so->engine.slo_quantile,
                  "Share of the chunk-filled iterations that should meet --slo-itl-ms: predictions are scaled by this "
                  "quantile of measured / predicted time over the recent iterations filled near the SLO")
      ->check(CLI::Range(0.01, 1.0))
      ->capture_default_str();
  cmd->add_option("--latency-table", *table_path,
                  "Latency table from `spear tune` for --slo-itl-ms (default: measured at start-up)")
      ->check(CLI::ExistingFile);
  auto table_out = std::make_shared<std::string>();
  cmd->add_option("--latency-table-out", *table_out,
                  "Write the latency table measured at start-up (--slo-itl-ms without --latency-table) to this JSON file");
  cmd->add_option("--iteration-log", so->engine.iteration_log,
                  "Append one JSON line per engine iteration to this file: decode and prompt tokens, the chunk budget, "
                  "predicted (with --slo-itl-ms) and measured forward ms, the gap since the previous iteration");
  auto ec_density = std::make_shared<double>(0.0);
  auto ec_rank = std::make_shared<int>(16), ec_gate = std::make_shared<int>(8);
  cmd->add_option("--ec-density", *ec_density,
                  "Benchmarks: attach random-weight compensators to this fraction of the decoder linears (e.g. a "
                  "random model from `spear make-model`; the latency table measured at start-up includes them)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--ec-rank", *ec_rank, "Rank of the --ec-density compensators")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  cmd->add_option("--ec-gate", *ec_gate, "Gate width of the --ec-density compensators (0: static)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  auto no_warm_up = std::make_shared<bool>(false);
  cmd->add_flag("--no-warm-up", *no_warm_up,
                "--device cuda: skip the start-up passes (one sequence of every length up to --chunk + --max-running, "
                "decode batches of every size) that tune kernel plans, pay each iteration size's one-time costs and "
                "capture CUDA graphs before /health turns ready (about 4-12 s on an 8B model)");
  cmd->add_option("--drain-seconds", so->drain_seconds, "On shutdown, time for accepted requests to finish")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([=] {
    serve::ServerOptions opts = *so;
    opts.max_body_bytes = size_t(*max_body_kb) * 1024;
    opts.warm_up = o->device == "cuda" && !*no_warm_up;
    if (tp_rank_of(*o) > 0) {
      // A tensor-parallel rank other than 0 runs no server: it replays rank 0's forward passes on its shard until
      // rank 0 shuts down. Ctrl-C reaches every process of the terminal; rank 0 drains and then stops this one.
      std::signal(SIGINT, SIG_IGN);
      auto backend = make_backend(*o);
      backend->set_prefill_graphs(false);  // as rank 0's (below)
      auto model = Model::load(o->model_dir, *backend);
      if (*ec_density > 0) attach_random_compensators(*model, *ec_density, *ec_rank, *ec_gate, 1234);
      model->follow();
      return;
    }
    if (opts.model_name.empty())
      opts.model_name = std::filesystem::path(o->model_dir).lexically_normal().filename().string();
    if (opts.model_name.empty()) opts.model_name = "spear";
    // Signals go to one watcher thread (blocked everywhere else, including the server's threads).
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

    serve::Server server(opts);
    const int port = server.bind();
    std::thread http([&] { server.run(); });
    std::fprintf(stderr, "spear serve: listening on http://%s:%d (loading %s)\n", opts.host.c_str(), port,
                 o->model_dir.c_str());
    std::thread watcher([&] {
      int sig = 0;
      sigwait(&sigs, &sig);
      std::fprintf(stderr, "spear serve: signal %d, shutting down (draining up to %.0f s)\n", sig,
                   opts.drain_seconds);
      server.stop();
    });
    try {
      auto backend = make_backend(*o);
      backend->set_prefill_graphs(false);  // iterations of many shapes; the latency table is eager (spear tune)
      Tokenizer tok = Tokenizer::from_dir(o->model_dir);
      auto model = Model::load(o->model_dir, *backend);
      if (*ec_density > 0) {
        const size_t n = attach_random_compensators(*model, *ec_density, *ec_rank, *ec_gate, 1234).size();
        std::fprintf(stderr, "spear serve: %zu random compensators (rank %d, gate width %d) attached\n", n, *ec_rank,
                     *ec_gate);
      }
      if (model->shard().size > 1) model->lead();
      if (opts.engine.slo_itl_ms > 0) {
        // The table must come before the engine, which reads it at construction: attach() builds the engine.
        LatencyTable t;
        if (table_path->empty()) {
          const int max_tokens = std::min(2 * opts.engine.chunk, 1024);
          t = LatencyTable::measure(*model, default_latency_points(max_tokens), 3);
          t.measure_batches(*model, 3, opts.engine.max_running, std::min(max_tokens, model->config().max_position_embeddings));
          if (!table_out->empty()) t.save(*table_out);
        } else {
          t = LatencyTable::load(*table_path);
        }
        server.set_latency_table(std::make_shared<const LatencyTable>(std::move(t)));
      }
      if (server.attach(*model, tok))
        std::fprintf(stderr, "spear serve: ready, model '%s' on %s\n", opts.model_name.c_str(), o->device.c_str());
      http.join();
      pthread_kill(watcher.native_handle(), SIGTERM);  // wakes sigwait if the server stopped on its own
      watcher.join();
    } catch (...) {
      server.stop();
      if (http.joinable()) http.join();
      pthread_kill(watcher.native_handle(), SIGTERM);
      watcher.join();
      throw;
    }
    std::fprintf(stderr, "spear serve: stopped\n");
  });
}

}  // namespace spear::cli
