#pragma once
// Continuous-batching engine (DESIGN.md §5). Requests join and leave at every iteration; one iteration is one
// forward pass over the next token of every decoding request plus up to `chunk` prompt tokens of requests
// still prefilling (chunked prefill, in arrival order). The KV cache is accounted in 16-token blocks
// (kv_blocks.h); when a request cannot get the block it needs, the most recently admitted request is
// preempted: its blocks are freed and it waits again at the head of the queue, to be recomputed from its prompt
// and the tokens it already produced. No request ever fails for lack of KV space, and every submitted request
// ends with exactly one finished event ("stop", "length", "abort" or "error").
//
// Threads: submit(), cancel() and stats() may be called from any thread; step() and the event callbacks run on
// the engine's thread (the one calling step / run_until_idle).
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/kv_blocks.h"
#include "runtime/latency_table.h"
#include "runtime/sampler.h"
#include "runtime/text_stream.h"

namespace spear {

struct Request {
  std::vector<int32_t> prompt;
  int max_tokens = 16;             // new tokens at most (0: finish at once, "length")
  SamplingParams sampling;         // per request (greedy when temperature is 0), seeded
  std::vector<std::string> stop;   // stop strings, matched on the decoded text (needs the engine's decoder)
  std::vector<int32_t> stop_ids;   // end-of-sequence token ids
  bool ignore_eos = false;         // keep going past stop_ids
};

struct RequestEvent {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  // tokens produced since the last event (0 or 1)
  std::string text;             // text that became final since the last event (with a decoder)
  bool finished = false;
  std::string finish_reason;  // when finished: "stop", "length", "abort" or "error"
  std::string error;          // when finish_reason == "error"
  int prompt_tokens = 0, completion_tokens = 0;
};
using EventFn = std::function<void(const RequestEvent&)>;

struct EngineOptions {
  int max_running = 8;  // KV slots: requests prefilling or decoding at once
  int max_context = 0;  // prompt + output tokens per request (0: the model's context length)
  int kv_blocks = 0;    // KV budget in blocks (0: max_running × max_context / 16, i.e. never preempts)
  int chunk = 256;      // prompt tokens per iteration, on top of the decode tokens
  int max_waiting = 4096;
  // SLO-constrained chunked prefill: with a latency table of this model (runtime/latency_table.h), each
  // iteration takes the largest prompt chunk (<= chunk) whose predicted iteration time, with the decode tokens
  // of that iteration, stays within slo_itl_ms (none when even one token would break it: prompts then wait for
  // decodes to finish, which bounds the wait). 0: fixed chunk.
  // Predictions are rescaled online (SloCalibrator): by the slo_quantile of measured / predicted over the recent
  // iterations that were filled near the SLO, so that the SLO holds for that share of them, not on average.
  double slo_itl_ms = 0;
  bool slo_calibrate = true;  // false: the table's predictions as they are (tests that need exact chunks)
  double slo_quantile = 0.99;  // the calibration's quantile (0.5: the median; 1: the worst of the window)
  std::shared_ptr<const LatencyTable> latency;
  // Non-empty: one JSON line per iteration appended to this file (its composition, the chunk budget, the predicted
  // and measured forward time, the gap since the previous iteration), to see what a scheduler did and why.
  std::string iteration_log;
};

struct EngineStats {
  int running = 0, waiting = 0;
  int kv_blocks_used = 0, kv_blocks_total = 0;
  uint64_t iterations = 0, preemptions = 0, finished = 0, tokens_generated = 0;
  int last_chunk_budget = 0;  // prompt tokens the last iteration allowed
  int compute_threads = 0;    // OpenMP threads of the thread that runs the iterations (omp_get_max_threads)
  // With an ITL SLO: iterations that had decode tokens (the ones the SLO governs), their predicted and
  // measured forward times (sums), and how many took longer than the SLO: the predictor's bias, live.
  uint64_t slo_iterations = 0, slo_over = 0;
  double slo_predicted_ms = 0, slo_measured_ms = 0;  // predicted: the table's, before slo_scale
  double slo_scale = 1;  // the calibration (SloCalibrator::scale) of the last iteration's size class
  // Of them, the mixed ones (prompt tokens beside the decodes: the iterations whose chunk the search chose, and
  // the only ones the calibration learns from: decode-only steps replay CUDA graphs and run faster than the
  // eager passes the table was measured on, so they would teach it to over-fill the mixed ones).
  uint64_t slo_mixed_iterations = 0, slo_mixed_over = 0;
  double slo_mixed_predicted_ms = 0, slo_mixed_measured_ms = 0;
  // Prompt tokens per iteration (chunked prefill), by bucket: 0, 1, 2-3, 4-7, ..., 512-1023, >= 1024.
  static constexpr int kChunkBuckets = 12;
  std::array<uint64_t, kChunkBuckets> prompt_tokens_per_iteration{};
};

class Engine {
 public:
  Engine(Model& model, const EngineOptions& options, TextStream::Decode decode = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request; throws spear::Error for an invalid one (empty prompt, prompt that leaves no room in the
  // context, negative max_tokens, stop strings without a decoder, a full queue). Returns its id.
  uint64_t submit(Request r, EventFn on_event);
  void cancel(uint64_t id);  // the request ends with "abort" at the next iteration
  // One iteration: admit, schedule, one forward pass, sample, emit events. False when there was no work.
  bool step();
  void run_until_idle();
  // Before the first request (the engine idle): runs the passes whose first occurrence costs extra on a GPU
  // backend, so that they stay out of the first requests' latencies: one sequence of every length up to chunk +
  // max_running tokens (prefill scratch, plan tuning, and the one-time costs of each iteration size), then decode
  // steps of every batch size from max_running down to 1, twice each (eager, then the CUDA graph capture; largest
  // first, so the attention scratch never grows again and drops earlier graphs).
  // The passes use token 0 at positions from 0 in the KV slots, which every request writes before it reads
  // them. Returns the seconds it took.
  double warm_up();
  // Ends every queued and running request with an error event (shutdown, or a forward pass that threw).
  void abort_all(const std::string& why);
  // Refuses every later submit() (spear::Error "the engine is shut down"); with abort_all afterwards, no
  // request can slip in between and wait forever.
  void close();
  bool idle() const;
  // Blocks until there is work (a request or a cancel arrived, or requests are queued / running) or the
  // timeout passes; for a serving loop: while (!stop) { engine.wait_for_work(100ms); engine.step(); }.
  void wait_for_work(std::chrono::milliseconds timeout);
  EngineStats stats() const;
  const EngineOptions& options() const { return opt_; }

 private:
  struct Seq;
  void take_incoming();
  void finish(Seq& s, const std::string& reason, const std::string& error = {});
  void preempt(Seq& s);
  void publish_occupancy();  // running / waiting / KV blocks into stats_ (engine thread)

  Model& model_;
  EngineOptions opt_;
  TextStream::Decode decode_;
  std::unique_ptr<KvCache> cache_;
  KvBlockAllocator blocks_;
  std::vector<int> free_slots_;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;  // in admission order

  mutable std::mutex mu_;  // guards incoming_, cancels_, stats_ and next_id_
  std::condition_variable work_cv_;
  std::vector<std::unique_ptr<Seq>> incoming_;
  std::vector<uint64_t> cancels_;
  EngineStats stats_;
  uint64_t next_id_ = 1;
  bool closed_ = false;
  SloCalibrator slo_cal_;  // engine thread; see EngineStats::slo_scale
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> iteration_log_{nullptr, &std::fclose};  // EngineOptions::iteration_log
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now(), last_end_ = t0_;
};

}  // namespace spear
