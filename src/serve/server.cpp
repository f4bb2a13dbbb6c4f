#include "serve/server.h"

#include <chrono>
#include <cstdio>
#include <csignal>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>

#include <sys/socket.h>

#include <omp.h>

#include <fmt/format.h>
#include <httplib.h>

#include "core/error.h"
#include "serve/openai_api.h"

namespace spear::serve {

namespace {

using clock_type = std::chrono::steady_clock;
using nlohmann::json;

// Events of one request, from the engine thread to the HTTP thread that answers it.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<RequestEvent> events;
  clock_type::time_point start = clock_type::now(), last_token;
  bool any_token = false;
};

long unix_now() {
  return long(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                  .count());
}

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  return fmt::format("{}-{:016x}{:08x}", prefix, salt, counter.fetch_add(1));
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(to_wire(e.body()), "application/json");
}

std::string sse(const json& j) { return "data: " + to_wire(j) + "\n\n"; }

const char* status_text(int status) {
  switch (status) {
    case 400: return "bad request";
    case 404: return "no such endpoint";
    case 405: return "method not allowed";
    case 413: return "request body too large";
    case 414: return "URI too long";
    case 431: return "request header fields too large";
    default: return status >= 500 ? "server error" : "request error";
  }
}

}  // namespace

Server::Server(ServerOptions o) : opt_(std::move(o)), http_(std::make_unique<httplib::Server>()) {
  SPEAR_CHECK(opt_.max_connections >= 1, "serve: --max-connections must be >= 1");
  std::signal(SIGPIPE, SIG_IGN);  // a client that left must not end the process; the write just fails
  httplib::Server& s = *http_;
  s.new_task_queue = [n = opt_.max_connections] { return new httplib::ThreadPool(size_t(n)); };
  s.set_payload_max_length(opt_.max_body_bytes);
  s.set_read_timeout(30, 0);
  // cpp-httplib 0.11 listens with a backlog of 5: a burst of clients then overflows the accept queue and some
  // connections are reset. Keep the default options (SO_REUSEADDR, ...) and note the socket, so that bind()
  // can listen again with the system's maximum backlog.
  s.set_socket_options([this](socket_t sock) {
    httplib::default_socket_options(sock);
    listen_fd_ = int(sock);
  });
  s.set_write_timeout(30, 0);

  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool ok = ready_ && !draining_;
    res.status = ok ? 200 : 503;
    res.set_content(json{{"status", ok ? "ok" : (draining_ ? "shutting down" : "loading")}}.dump(),
                    "application/json");
  });
  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json m = {{"id", opt_.model_name}, {"object", "model"}, {"created", unix_now()}, {"owned_by", "spear"}};
    res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), "application/json");
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.render(engine_ ? engine_->stats() : EngineStats{}), "text/plain; version=0.0.4");
  });
  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handle_generation(req.body, false, res);
  });
  s.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handle_generation(req.body, true, res);
  });
  // Statuses httplib sets itself (404 unknown path, 413 body too large, 400 bad request line) get the
  // OpenAI error envelope too.
  s.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e{res.status, fmt::format("{} {}: {}", req.method, req.path, status_text(res.status)),
               res.status == 404 ? "not_found_error" : "invalid_request_error", {}};
    if (res.status == 413) e.message = fmt::format("the request body exceeds {} bytes", opt_.max_body_bytes);
    metrics_.rejected(res.status);
    send_error(res, e);
  });
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError{500, what, "server_error", {}});
  });
}

Server::~Server() {
  stop();
  stop_engine_ = true;
  if (engine_thread_.joinable()) engine_thread_.join();
}

int Server::bind() {
  int port = opt_.port;
  if (port == 0) {
    port = http_->bind_to_any_port(opt_.host);
  } else if (!http_->bind_to_port(opt_.host, port)) {
    port = -1;
  }
  SPEAR_CHECK(port > 0, "serve: cannot listen on {}:{} (in use, or not an address of this machine)", opt_.host,
              opt_.port);
  if (listen_fd_ >= 0) ::listen(listen_fd_, SOMAXCONN);  // a larger accept queue (see the constructor)
  return port;
}

void Server::run() { http_->listen_after_bind(); }

bool Server::attach(Model& model, const Tokenizer& tok) {
  std::lock_guard<std::mutex> lock(life_mu_);
  if (draining_) return false;  // stopped while the model was loading: nothing to start
  SPEAR_CHECK(!engine_, "serve: a model is already attached");
  tok_ = &tok;
  engine_ = std::make_unique<Engine>(model, opt_.engine,
                                     [t = &tok](std::span<const int32_t> ids) { return t->decode(ids, true); });
  if (opt_.warm_up) {
    const double s = engine_->warm_up();
    std::fprintf(stderr,
                 "spear serve: warmed up (one sequence of every length up to chunk + max-running, decode batches of "
                 "1..%d) in %.1f s\n",
                 opt_.engine.max_running, s);
  }
  // OpenMP's thread count belongs to each thread: a std::thread starts with the process default (every core), not
  // with what --threads set in this one, and a compute thread too many fights the load beside the server.
  const int omp_threads = omp_get_max_threads();
  engine_thread_ = std::thread([this, omp_threads] {
    omp_set_num_threads(omp_threads);
    engine_loop();
  });
  ready_ = true;
  return true;
}

void Server::engine_loop() {
  while (!stop_engine_) {
    engine_->wait_for_work(std::chrono::milliseconds(50));
    if (stop_engine_) break;
    try {
      engine_->step();
    } catch (const std::exception& e) {
      engine_->abort_all(std::string("engine failure: ") + e.what());
    }
  }
}

void Server::stop() {
  std::lock_guard<std::mutex> lock(life_mu_);
  if (draining_.exchange(true)) return;
  if (engine_) {
    const auto deadline = clock_type::now() + std::chrono::duration<double>(opt_.drain_seconds);
    while (!engine_->idle() && clock_type::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    stop_engine_ = true;
    if (engine_thread_.joinable()) engine_thread_.join();
    engine_->close();  // a handler that passed its draining check just now gets 503 instead of waiting forever
    engine_->abort_all("the server is shutting down");  // the engine thread is gone: safe here
  }
  http_->stop();
}

void Server::handle_generation(const std::string& body, bool chat, httplib::Response& res) {
  if (!ready_ || draining_) {
    metrics_.rejected(503);
    send_error(res, ApiError{503, draining_ ? "the server is shutting down" : "the model is still loading",
                             "server_error", {}});
    return;
  }
  auto parsed = parse_request(body, chat, opt_.model_name);
  if (auto* e = std::get_if<ApiError>(&parsed)) {
    metrics_.rejected(e->status);
    send_error(res, *e);
    return;
  }
  const GenerationRequest g = std::get<GenerationRequest>(std::move(parsed));
  std::string prompt_text = g.prompt;
  std::vector<std::string> stops = g.stop;
  if (chat) {
    ChatPrompt cp = apply_chat_template(g.messages, *tok_);
    prompt_text = cp.text;
    stops.insert(stops.end(), cp.stop.begin(), cp.stop.end());
  }
  Request r;
  r.prompt = tok_->encode(prompt_text, true);
  r.max_tokens = g.max_tokens;
  r.sampling = g.sampling;
  r.stop = stops;
  r.stop_ids = tok_->eos_ids();
  auto ch = std::make_shared<Channel>();
  EventFn on_event = [ch, this](const RequestEvent& e) {
    const auto now = clock_type::now();
    if (!e.tokens.empty()) {
      if (!ch->any_token)
        metrics_.first_token(std::chrono::duration<double>(now - ch->start).count());
      else
        metrics_.inter_token(std::chrono::duration<double>(now - ch->last_token).count());
      ch->any_token = true;
      ch->last_token = now;
    }
    if (e.finished)
      metrics_.request_done(e.finish_reason, e.prompt_tokens, e.completion_tokens,
                            std::chrono::duration<double>(now - ch->start).count());
    std::lock_guard<std::mutex> lock(ch->mu);
    ch->events.push_back(e);
    ch->cv.notify_all();
  };
  uint64_t id = 0;
  try {
    id = engine_->submit(std::move(r), on_event);
  } catch (const Error& e) {
    const std::string msg = e.what();
    const bool full = msg.find("queue is full") != std::string::npos;
    const bool closed = msg.find("shut down") != std::string::npos;
    const ApiError err{full ? 429 : closed ? 503 : 400, msg,
                       full ? "rate_limit_error" : closed ? "server_error" : "invalid_request_error",
                       msg.find("prompt") != std::string::npos ? "prompt" : ""};
    metrics_.rejected(err.status);
    send_error(res, err);
    return;
  }
  const std::string cid = new_id(chat ? "chatcmpl" : "cmpl");
  const long created = unix_now();
  const std::string echo = !chat && g.echo ? g.prompt : std::string();

  if (!g.stream) {
    std::string text = echo, reason, error;
    int pt = 0, ct = 0;
    for (bool done = false; !done;) {
      std::unique_lock<std::mutex> lock(ch->mu);
      ch->cv.wait(lock, [&] { return !ch->events.empty(); });
      for (; !ch->events.empty(); ch->events.pop_front()) {
        const RequestEvent& e = ch->events.front();
        text += e.text;
        if (e.finished) {
          done = true;
          reason = e.finish_reason;
          error = e.error;
          pt = e.prompt_tokens;
          ct = e.completion_tokens;
        }
      }
    }
    if (reason == "error" || reason == "abort") {
      send_error(res, ApiError{503, error.empty() ? "the request was aborted" : error, "server_error", {}});
      return;
    }
    res.set_content(to_wire(completion_response(cid, created, opt_.model_name, text, reason, pt, ct, chat)),
                    "application/json");
    return;
  }

  res.set_header("Cache-Control", "no-cache");
  auto first = std::make_shared<bool>(true);
  const bool usage = g.include_usage, every_usage = g.continuous_usage;
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, ch, id, cid, created, chat, echo, first, usage, every_usage](size_t, httplib::DataSink& sink) {
        std::deque<RequestEvent> evs;
        {
          std::unique_lock<std::mutex> lock(ch->mu);
          ch->cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return !ch->events.empty(); });
          evs.swap(ch->events);
        }
        // A client that left: cancel the request and end the response as if it were complete (returning false
        // takes a path of cpp-httplib 0.11 that, under load, also broke other fresh connections).
        auto gone = [&] {
          engine_->cancel(id);
          sink.done();
          return true;
        };
        auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
        // A content chunk, with the usage so far when the client asked for it in every chunk.
        auto chunk = [&](const RequestEvent& e, const std::string& text, const std::optional<std::string>& reason) {
          json c = stream_chunk(cid, created, opt_.model_name, text, reason, chat, *first);
          if (every_usage) c["usage"] = usage_json(e.prompt_tokens, e.completion_tokens);
          return sse(c);
        };
        if (evs.empty()) return sink.is_writable() ? true : gone();
        for (const RequestEvent& e : evs) {
          std::string text = e.text;
          if (*first) text = echo + text;
          if ((!text.empty() || (*first && chat)) && !write(chunk(e, text, std::nullopt))) return gone();
          if (!text.empty() || chat) *first = false;
          if (!e.finished) continue;
          bool ok = true;
          if (e.finish_reason == "error" || e.finish_reason == "abort") {
            ok = write(sse(ApiError{503, e.error.empty() ? "the request was aborted" : e.error, "server_error", {}}
                               .body()));
          } else {
            *first = false;
            ok = write(chunk(e, "", e.finish_reason));
            if (ok && usage) {
              json u = {{"id", cid},
                        {"object", chat ? "chat.completion.chunk" : "text_completion"},
                        {"created", created},
                        {"model", opt_.model_name},
                        {"choices", json::array()},
                        {"usage", usage_json(e.prompt_tokens, e.completion_tokens)}};
              ok = write(sse(u));
            }
          }
          if (!ok || !write("data: [DONE]\n\n")) return gone();
          sink.done();
          return true;
        }
        return true;
      },
      [this, id](bool success) {
        if (!success && engine_) engine_->cancel(id);  // finished requests ignore it
      });
}

}  // namespace spear::serve
