#pragma once
// `spear serve`: the OpenAI-compatible HTTP server (cpp-httplib) in front of the continuous-batching engine.
// Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
// GET /health (503 until a model is attached), GET /metrics (Prometheus). One engine thread runs the
// iterations; HTTP threads parse, submit and wait on a per-request channel fed by the engine's callback.
// Every accepted request ends with a response or an error; a client that goes away mid-stream cancels its
// request (its KV blocks come back at the next iteration).
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "model/model.h"
#include "runtime/engine.h"
#include "serve/metrics.h"
#include "tokenizer/tokenizer.h"

namespace httplib {
class Server;
struct Response;
}

namespace spear::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;             // 0: any free port (bind() returns it)
  std::string model_name;      // the name clients send as "model"
  size_t max_body_bytes = size_t(1) << 20;
  int max_connections = 512;   // HTTP worker threads (each streaming client holds one)
  double drain_seconds = 30;   // on stop(): time for accepted requests to finish before they get an error
  bool warm_up = false;        // Engine::warm_up() before /health turns ready (spear serve: on for --device cuda)
  EngineOptions engine;
};

class Server {
 public:
  explicit Server(ServerOptions o);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int bind();  // listens on host:port; returns the port; throws spear::Error when it cannot
  void run();  // serves until stop() (blocking; call bind() first)
  // Attaches the model (after loading it while /health answers 503) and starts the engine thread; false when
  // stop() came first (nothing is started).
  bool attach(Model& model, const Tokenizer& tok);
  // The latency table for an ITL SLO (ServerOptions::engine.slo_itl_ms); before attach().
  void set_latency_table(std::shared_ptr<const LatencyTable> t) { opt_.engine.latency = std::move(t); }
  // Graceful shutdown: new requests get 503, accepted ones finish within drain_seconds (then end with an
  // error), then the listener closes and run() returns. Safe from any thread (and from a signal watcher).
  void stop();
  Engine* engine() { return engine_.get(); }

 private:
  void engine_loop();
  void handle_generation(const std::string& body, bool chat, httplib::Response& res);

  ServerOptions opt_;
  std::unique_ptr<httplib::Server> http_;
  std::unique_ptr<Engine> engine_;
  const Tokenizer* tok_ = nullptr;
  Metrics metrics_;
  std::atomic<bool> ready_{false}, draining_{false}, stop_engine_{false};
  int listen_fd_ = -1;
  std::mutex life_mu_;  // attach() and stop() exclude each other
  std::thread engine_thread_;
};

}  // namespace spear::serve
