#include "serve/metrics.h"

#include <fmt/format.h>

namespace spear::serve {

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++n_;
}

std::string Histogram::render(const std::string& name, const std::string& help) const {
  std::string s = fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    s += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cum);
  }
  s += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, n_, name, sum_, name, n_);
  return s;
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.016, 0.022, 0.033, 0.05, 0.1, 0.25, 0.5, 1}),
      e2e_({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}) {}

void Metrics::request_done(const std::string& outcome, int prompt_tokens, int completion_tokens, double e2e) {
  std::lock_guard<std::mutex> lock(mu_);
  ++outcomes_[outcome];
  prompt_tokens_ += uint64_t(prompt_tokens);
  completion_tokens_ += uint64_t(completion_tokens);
  e2e_.observe(e2e);
}

void Metrics::first_token(double s) {
  std::lock_guard<std::mutex> lock(mu_);
  ttft_.observe(s);
}

void Metrics::inter_token(double s) {
  std::lock_guard<std::mutex> lock(mu_);
  itl_.observe(s);
}

void Metrics::rejected(int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++rejected_[status];
}

std::string Metrics::render(const EngineStats& e) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string s;
  s += "# HELP spear_requests_total Requests that reached the engine, by how they ended.\n"
       "# TYPE spear_requests_total counter\n";
  for (const char* o : {"stop", "length", "abort", "error"})
    s += fmt::format("spear_requests_total{{finish_reason=\"{}\"}} {}\n", o,
                     outcomes_.count(o) ? outcomes_.at(o) : 0);
  s += "# HELP spear_requests_rejected_total Requests refused before the engine, by HTTP status.\n"
       "# TYPE spear_requests_rejected_total counter\n";
  for (const auto& [status, n] : rejected_) s += fmt::format("spear_requests_rejected_total{{status=\"{}\"}} {}\n", status, n);
  s += fmt::format("# TYPE spear_prompt_tokens_total counter\nspear_prompt_tokens_total {}\n", prompt_tokens_);
  s += fmt::format("# TYPE spear_generation_tokens_total counter\nspear_generation_tokens_total {}\n",
                   completion_tokens_);
  s += fmt::format("# HELP spear_requests_running Requests prefilling or decoding.\n"
                   "# TYPE spear_requests_running gauge\nspear_requests_running {}\n",
                   e.running);
  s += fmt::format("# HELP spear_requests_waiting Requests queued for a KV slot.\n"
                   "# TYPE spear_requests_waiting gauge\nspear_requests_waiting {}\n",
                   e.waiting);
  s += fmt::format("# TYPE spear_kv_blocks_used gauge\nspear_kv_blocks_used {}\n", e.kv_blocks_used);
  s += fmt::format("# TYPE spear_kv_blocks_total gauge\nspear_kv_blocks_total {}\n", e.kv_blocks_total);
  s += fmt::format("# TYPE spear_kv_usage_ratio gauge\nspear_kv_usage_ratio {}\n",
                   e.kv_blocks_total ? double(e.kv_blocks_used) / e.kv_blocks_total : 0.0);
  s += fmt::format("# TYPE spear_preemptions_total counter\nspear_preemptions_total {}\n", e.preemptions);
  s += fmt::format("# TYPE spear_engine_iterations_total counter\nspear_engine_iterations_total {}\n", e.iterations);
  s += fmt::format("# HELP spear_compute_threads CPU threads of the engine's forward passes (OpenMP).\n"
                   "# TYPE spear_compute_threads gauge\nspear_compute_threads {}\n",
                   e.compute_threads);
  {
    s += "# HELP spear_iteration_prompt_tokens Prompt tokens (chunked prefill) per engine iteration.\n"
         "# TYPE spear_iteration_prompt_tokens histogram\n";
    uint64_t cum = 0;
    for (int b = 0; b < EngineStats::kChunkBuckets; ++b) {
      cum += e.prompt_tokens_per_iteration[size_t(b)];
      const std::string le = b + 1 < EngineStats::kChunkBuckets ? std::to_string((1 << b) - 1) : "+Inf";
      s += fmt::format("spear_iteration_prompt_tokens_bucket{{le=\"{}\"}} {}\n", le, cum);
    }
    s += fmt::format("spear_iteration_prompt_tokens_count {}\n", cum);
  }
  if (e.slo_iterations > 0) {
    s += fmt::format("# HELP spear_slo_iterations_total Iterations with decode tokens under --slo-itl-ms.\n"
                     "# TYPE spear_slo_iterations_total counter\nspear_slo_iterations_total {}\n",
                     e.slo_iterations);
    // A counter pair: an iteration kind's forward time as the latency table predicted it and as measured.
    auto ms_pair = [&s](const char* name, const char* help, double predicted, double measured) {
      s += fmt::format("# HELP {0} {1}\n# TYPE {0} counter\n{0}{{kind=\"predicted\"}} {2:.3f}\n"
                       "{0}{{kind=\"measured\"}} {3:.3f}\n",
                       name, help, predicted, measured);
    };
    ms_pair("spear_slo_iteration_ms_total", "Their forward time, predicted by the latency table and measured.",
            e.slo_predicted_ms, e.slo_measured_ms);
    s += fmt::format("# HELP spear_slo_prediction_scale The calibration of measured / predicted forward time (its "
                     "--slo-quantile) of the last iteration's size class: the factor the chunk search applied to "
                     "the latency table there.\n# TYPE spear_slo_prediction_scale gauge\n"
                     "spear_slo_prediction_scale {:.4f}\n",
                     e.slo_scale);
    s += fmt::format("# HELP spear_slo_iterations_over_total Of them, those whose forward pass took longer than the "
                     "SLO.\n# TYPE spear_slo_iterations_over_total counter\nspear_slo_iterations_over_total {}\n",
                     e.slo_over);
    s += fmt::format("# HELP spear_slo_mixed_iterations_total Of them, those with prompt tokens beside the decodes "
                     "(the chunk search's; the calibration learns from these only).\n"
                     "# TYPE spear_slo_mixed_iterations_total counter\nspear_slo_mixed_iterations_total {}\n",
                     e.slo_mixed_iterations);
    ms_pair("spear_slo_mixed_iteration_ms_total", "Their forward time, predicted and measured.",
            e.slo_mixed_predicted_ms, e.slo_mixed_measured_ms);
    s += fmt::format("# HELP spear_slo_mixed_iterations_over_total Mixed iterations over the SLO.\n"
                     "# TYPE spear_slo_mixed_iterations_over_total counter\nspear_slo_mixed_iterations_over_total {}\n",
                     e.slo_mixed_over);
  }
  s += ttft_.render("spear_time_to_first_token_seconds", "Time from arrival to the first generated token.");
  s += itl_.render("spear_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
  s += e2e_.render("spear_e2e_request_latency_seconds", "Time from arrival to the end of a request.");
  return s;
}

}  // namespace spear::serve
