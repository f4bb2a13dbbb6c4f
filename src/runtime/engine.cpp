#include "runtime/engine.h"

#include <algorithm>
#include <cstdio>
#include <span>

#include <omp.h>

#include "core/error.h"
#include "core/progress.h"

namespace spear {

struct Engine::Seq {
  uint64_t id = 0;
  Request req;
  EventFn cb;
  std::vector<int32_t> tokens;  // prompt, then every generated token: what the KV cache must end up holding
  int n_prompt = 0;
  int computed = 0;  // tokens already in the KV cache
  int slot = -1;
  int generated = 0;
  Sampler sampler;
  std::unique_ptr<TextStream> text;
  Seq(Request r, EventFn f, uint64_t i, const TextStream::Decode& decode)
      : id(i), req(std::move(r)), cb(std::move(f)), sampler(req.sampling) {
    tokens = req.prompt;
    n_prompt = int(tokens.size());
    if (decode) text = std::make_unique<TextStream>(decode, req.stop);
  }
  void emit(RequestEvent e) {
    e.id = id;
    e.prompt_tokens = n_prompt;
    e.completion_tokens = generated;
    if (cb) cb(e);
  }
};

namespace {

int context_of(const Model& m, const EngineOptions& o) {
  const int model_ctx = m.config().max_position_embeddings;
  return o.max_context > 0 ? std::min(o.max_context, model_ctx) : model_ctx;
}

EngineOptions resolved(const Model& m, EngineOptions o) {
  SPEAR_CHECK(o.max_running >= 1, "engine: max_running must be >= 1, got {}", o.max_running);
  SPEAR_CHECK(o.chunk >= 1, "engine: chunk must be >= 1, got {}", o.chunk);
  SPEAR_CHECK(o.slo_itl_ms <= 0 || o.latency, "engine: an ITL SLO needs a latency table");
  SPEAR_CHECK(o.slo_quantile > 0 && o.slo_quantile <= 1, "engine: slo_quantile must be in (0, 1], got {}",
              o.slo_quantile);
  o.max_context = context_of(m, o);
  if (o.kv_blocks <= 0) o.kv_blocks = o.max_running * KvBlockAllocator::blocks_for(o.max_context);
  // One request must always fit alone, or preemption could not make progress.
  SPEAR_CHECK(o.kv_blocks >= KvBlockAllocator::blocks_for(o.max_context),
              "engine: {} KV blocks cannot hold one request of the full context ({} tokens = {} blocks)", o.kv_blocks,
              o.max_context, KvBlockAllocator::blocks_for(o.max_context));
  return o;
}

}  // namespace

Engine::Engine(Model& model, const EngineOptions& options, TextStream::Decode decode)
    : model_(model),
      opt_(resolved(model, options)),
      decode_(std::move(decode)),
      cache_(model.make_kv_cache(opt_.max_running, opt_.max_context)),
      blocks_(opt_.kv_blocks, opt_.max_running),
      slo_cal_(opt_.slo_quantile) {
  for (int s = opt_.max_running - 1; s >= 0; --s) free_slots_.push_back(s);
  stats_.kv_blocks_total = opt_.kv_blocks;
  if (!opt_.iteration_log.empty()) {
    iteration_log_.reset(std::fopen(opt_.iteration_log.c_str(), "a"));
    SPEAR_CHECK(iteration_log_ != nullptr, "engine: cannot open the iteration log {}", opt_.iteration_log);
  }
}

Engine::~Engine() = default;

uint64_t Engine::submit(Request r, EventFn on_event) {
  SPEAR_CHECK(!r.prompt.empty(), "the prompt is empty (no tokens to condition on)");
  SPEAR_CHECK(r.max_tokens >= 0, "max_tokens must be >= 0, got {}", r.max_tokens);
  SPEAR_CHECK(int(r.prompt.size()) < opt_.max_context,
              "the prompt has {} tokens; the context holds {} (prompt + output), so at most {} prompt tokens",
              r.prompt.size(), opt_.max_context, opt_.max_context - 1);
  SPEAR_CHECK(r.stop.empty() || decode_, "stop strings need the engine's tokenizer");
  const int vocab = model_.config().vocab_size;
  for (int32_t t : r.prompt) SPEAR_CHECK(t >= 0 && t < vocab, "prompt token id {} is outside the vocabulary", t);
  std::lock_guard<std::mutex> lock(mu_);
  SPEAR_CHECK(!closed_, "the engine is shut down");
  SPEAR_CHECK(int(incoming_.size()) + stats_.waiting < opt_.max_waiting, "the engine's queue is full ({} requests)",
              opt_.max_waiting);
  const uint64_t id = next_id_++;
  incoming_.push_back(std::make_unique<Seq>(std::move(r), std::move(on_event), id, decode_));
  work_cv_.notify_all();
  return id;
}

void Engine::close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
}

void Engine::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.push_back(id);
  work_cv_.notify_all();
}

void Engine::wait_for_work(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  work_cv_.wait_for(lock, timeout, [&] {
    return !incoming_.empty() || !cancels_.empty() || stats_.running > 0 || stats_.waiting > 0;
  });
}

bool Engine::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return incoming_.empty() && cancels_.empty() && stats_.running == 0 && stats_.waiting == 0;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::take_incoming() {
  std::vector<std::unique_ptr<Seq>> in;
  std::vector<uint64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(mu_);
    in.swap(incoming_);
    cancels.swap(cancels_);
  }
  for (auto& s : in) waiting_.push_back(std::move(s));
  for (uint64_t id : cancels) {
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
      if ((*it)->id == id) {
        auto s = std::move(*it);
        waiting_.erase(it);
        finish(*s, "abort");
        break;
      }
    for (auto it = running_.begin(); it != running_.end(); ++it)
      if ((*it)->id == id) {
        auto s = std::move(*it);
        running_.erase(it);
        finish(*s, "abort");
        break;
      }
  }
}

// Releases the request's KV slot and blocks (if it holds them) and emits its finished event.
void Engine::finish(Seq& s, const std::string& reason, const std::string& error) {
  if (s.slot >= 0) {
    blocks_.release(s.slot);
    free_slots_.push_back(s.slot);
    s.slot = -1;
  }
  RequestEvent e;
  e.finished = true;
  e.finish_reason = reason;
  e.error = error;
  if (reason != "error" && reason != "abort" && s.text && !s.text->stopped()) e.text = s.text->flush();
  s.emit(std::move(e));
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.finished;
}

// Frees the request's KV and queues it again first; it will be recomputed from all its tokens.
void Engine::preempt(Seq& s) {
  blocks_.release(s.slot);
  free_slots_.push_back(s.slot);
  s.slot = -1;
  s.computed = 0;
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.preemptions;
}

bool Engine::step() {
  take_incoming();
  // Admission: requests that need no forward pass finish at once; others take a free slot.
  while (!waiting_.empty() && !free_slots_.empty()) {
    auto s = std::move(waiting_.front());
    waiting_.pop_front();
    if (s->req.max_tokens == 0) {
      finish(*s, "length");
      continue;
    }
    s->slot = free_slots_.back();
    free_slots_.pop_back();
    running_.push_back(std::move(s));
  }

  // Schedule: every decoding request's next token, then prompt chunks within the budget, in admission order;
  // a request that cannot get its blocks preempts the newest running request (possibly itself).
  struct Work {
    Seq* seq;
    int n;
  };
  std::vector<Work> work;
  int budget = opt_.chunk;
  if (opt_.slo_itl_ms > 0 && opt_.latency) {
    // The iteration's composition: every decode (one token at its context), then prompt chunks in order.
    std::vector<SeqWork> decodes, prompts;
    for (const auto& s : running_) {
      const int pending = int(s->tokens.size()) - s->computed;
      if (pending == 1) decodes.push_back({1, s->computed});
      if (pending > 1) prompts.push_back({pending, s->computed});
    }
    // No prompt token when even one would break the SLO (0): the GPU's time steps up after 64 and 128 tokens,
    // so a forced token beside 64 decodes cost a whole tier. Prompts then wait for decodes to finish, which they
    // do within their max_tokens, so every prompt still progresses; iterations without decodes take opt_.chunk.
    if (!decodes.empty() && !prompts.empty())
      budget = slo_chunk(*opt_.latency, slo_cal_, decodes, prompts, opt_.chunk, opt_.slo_itl_ms);
  }
  const int chunk_budget = budget;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.last_chunk_budget = budget;
    stats_.compute_threads = omp_get_max_threads();
  }
  for (size_t i = 0; i < running_.size(); ++i) {
    Seq& s = *running_[i];
    const int pending = int(s.tokens.size()) - s.computed;
    const int n = pending == 1 ? 1 : std::min(pending, budget);
    if (n <= 0) continue;
    bool self_preempted = false;
    while (!blocks_.reserve(s.slot, s.computed + n)) {
      Seq& victim = *running_.back();
      const bool self = &victim == &s;
      // Work already planned for the victim this iteration is dropped with it.
      work.erase(std::remove_if(work.begin(), work.end(), [&](const Work& w) { return w.seq == &victim; }),
                 work.end());
      preempt(victim);
      waiting_.push_front(std::move(running_.back()));
      running_.pop_back();
      if (self) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    if (pending > 1) budget -= n;
    work.push_back({&s, n});
  }
  publish_occupancy();
  if (work.empty()) return !waiting_.empty();

  Batch batch;
  for (const Work& w : work) {
    Seq& s = *w.seq;
    batch.seqs.push_back({int(batch.tokens.size()), w.n, s.computed, s.slot});
    batch.tokens.insert(batch.tokens.end(), s.tokens.begin() + s.computed, s.tokens.begin() + s.computed + w.n);
  }
  // When every sequence of the iteration decodes greedily, the argmax runs on the device and only the ids come
  // back (forward_greedy; on the GPU a decode-only iteration replays a CUDA graph); otherwise the last
  // position's logits of each sequence come to the host for its sampler.
  const bool greedy =
      std::all_of(work.begin(), work.end(), [](const Work& w) { return w.seq->sampler.greedy(); });
  // The SLO's iterations (those with a decode token): predicted time of what was scheduled, against the clock.
  double predicted_ms = -1;
  int iteration_tokens = 0;
  for (const Work& w : work) iteration_tokens += w.n;
  auto decodes_one = [](const Work& w) { return w.seq->computed + 1 == int(w.seq->tokens.size()); };
  if (opt_.slo_itl_ms > 0 && opt_.latency && std::any_of(work.begin(), work.end(), decodes_one)) {
    std::vector<SeqWork> composition;
    for (const Work& w : work) composition.push_back({w.n, w.seq->computed});
    predicted_ms = opt_.latency->predict_ms(composition);
  }
  const auto t_fwd = std::chrono::steady_clock::now();
  std::vector<float> logits;
  std::vector<int32_t> ids;
  try {
    if (greedy)
      ids = model_.forward_greedy(batch, *cache_);
    else
      logits = model_.forward(batch, *cache_, LogitsMode::LastPerSeq);
  } catch (const std::exception& e) {
    // Every accepted request ends with this error; the operator sees it too.
    std::fprintf(stderr, "spear engine: forward pass of %zu tokens failed: %s\n", batch.tokens.size(), e.what());
    abort_all(std::string("forward pass failed: ") + e.what());
    return true;
  }
  int prompt_tokens = 0;
  for (const Work& w : work) prompt_tokens += decodes_one(w) ? 0 : w.n;
  {
    int b = 0;
    while (b + 1 < EngineStats::kChunkBuckets && prompt_tokens >= (1 << b)) ++b;
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.prompt_tokens_per_iteration[size_t(b)];
  }
  const auto t_end = std::chrono::steady_clock::now();
  const double fwd_ms = std::chrono::duration<double, std::milli>(t_end - t_fwd).count();
  if (iteration_log_) {
    int decodes = 0;
    long decode_ctx = 0;
    std::string prompts;  // [n, pos0] of each prompt chunk
    for (const Work& w : work) {
      if (decodes_one(w)) {
        ++decodes;
        decode_ctx += w.seq->computed;
      } else {
        prompts += (prompts.empty() ? "[" : ", [") + std::to_string(w.n) + ", " + std::to_string(w.seq->computed) + "]";
      }
    }
    std::fprintf(iteration_log_.get(),
                 "{\"t\": %.4f, \"decodes\": %d, \"decode_ctx\": %ld, \"prompt_tokens\": %d, \"prompts\": [%s], "
                 "\"budget\": %d, \"predicted_ms\": %.3f, \"scale\": %.4f, \"forward_ms\": %.3f, \"gap_ms\": %.3f}\n",
                 std::chrono::duration<double>(t_fwd - t0_).count(), decodes, decode_ctx, prompt_tokens, prompts.c_str(),
                 chunk_budget, predicted_ms, slo_cal_.scale(iteration_tokens), fwd_ms,
                 std::chrono::duration<double, std::milli>(t_fwd - last_end_).count());
    std::fflush(iteration_log_.get());
  }
  last_end_ = t_end;
  if (predicted_ms >= 0) {
    // Online calibration: the table is measured once, apart from serving (other threads, caches, eager vs graph
    // passes), and its bias and spread show here (SloCalibrator). Mixed iterations only (see
    // EngineStats::slo_mixed_iterations).
    const bool mixed = prompt_tokens > 0;
    if (mixed && opt_.slo_calibrate) slo_cal_.add(iteration_tokens, predicted_ms, fwd_ms, opt_.slo_itl_ms);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.slo_scale = slo_cal_.scale(iteration_tokens);
    ++stats_.slo_iterations;
    stats_.slo_predicted_ms += predicted_ms;
    stats_.slo_measured_ms += fwd_ms;
    if (fwd_ms > opt_.slo_itl_ms) ++stats_.slo_over;
    if (mixed) {
      ++stats_.slo_mixed_iterations;
      stats_.slo_mixed_predicted_ms += predicted_ms;
      stats_.slo_mixed_measured_ms += fwd_ms;
      if (fwd_ms > opt_.slo_itl_ms) ++stats_.slo_mixed_over;
    }
  }
  const size_t vocab = size_t(model_.config().vocab_size);

  std::vector<Seq*> done;
  std::vector<std::string> reasons;
  uint64_t produced = 0;
  for (size_t i = 0; i < work.size(); ++i) {
    Seq& s = *work[i].seq;
    s.computed += work[i].n;
    if (s.computed < int(s.tokens.size())) continue;  // still prefilling
    const int32_t tok =
        greedy ? ids[i] : s.sampler.sample(std::span<const float>(logits.data() + i * vocab, vocab));
    s.tokens.push_back(tok);
    ++s.generated;
    ++produced;
    RequestEvent e;
    e.tokens.push_back(tok);
    const bool eos =
        !s.req.ignore_eos && std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), tok) != s.req.stop_ids.end();
    if (s.text && !eos) e.text = s.text->push(tok);
    std::string reason;
    if (eos || (s.text && s.text->stopped()))
      reason = "stop";
    else if (s.generated >= s.req.max_tokens || int(s.tokens.size()) >= opt_.max_context)
      reason = "length";
    s.emit(std::move(e));
    if (!reason.empty()) {
      done.push_back(&s);
      reasons.push_back(reason);
    }
  }
  for (size_t i = 0; i < done.size(); ++i) {
    auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == done[i]; });
    auto s = std::move(*it);
    running_.erase(it);
    finish(*s, reasons[i]);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.iterations;
    stats_.tokens_generated += produced;
  }
  publish_occupancy();
  return true;
}

double Engine::warm_up() {
  SPEAR_CHECK(running_.empty() && waiting_.empty(), "engine: warm_up needs an idle engine");
  const auto t0 = std::chrono::steady_clock::now();
  // Every iteration size serving can meet (a prompt chunk beside up to max_running decodes), once each: the first
  // pass of a new size pays one-time costs (library heuristics, buffers) of several milliseconds, which on the H200
  // were most of the iterations that ran over an ITL SLO.
  const int largest = std::max(1, std::min(opt_.chunk + opt_.max_running, opt_.max_context - 1));
  ProgressBar bar("warm-up", largest + opt_.max_running);
  for (int n = 1; n <= largest; ++n) {
    Batch prompt;
    prompt.tokens.assign(size_t(n), 0);
    prompt.seqs.push_back({0, n, 0, 0});
    model_.forward_greedy(prompt, *cache_);
    bar.update(n);
  }
  for (int B = opt_.max_running; B >= 1; --B) {
    Batch d;
    for (int i = 0; i < B; ++i) {
      d.seqs.push_back({i, 1, 0, i});
      d.tokens.push_back(0);
    }
    for (int rep = 0; rep < 2; ++rep) model_.forward_greedy(d, *cache_);
    bar.update(largest + opt_.max_running - B + 1);
  }
  bar.finish();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Engine::run_until_idle() {
  while (step() || !idle()) {
  }
}

void Engine::abort_all(const std::string& why) {
  take_incoming();
  while (!running_.empty()) {
    auto s = std::move(running_.back());
    running_.pop_back();
    finish(*s, "error", why);
  }
  while (!waiting_.empty()) {
    auto s = std::move(waiting_.front());
    waiting_.pop_front();
    finish(*s, "error", why);
  }
  publish_occupancy();
}

void Engine::publish_occupancy() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.running = int(running_.size());
  stats_.waiting = int(waiting_.size());
  stats_.kv_blocks_used = blocks_.used();
}

}  // namespace spear
