#pragma once
// Prometheus metrics of `spear serve` (text exposition format 0.0.4): request counts by outcome, tokens,
// time to first token, inter-token latency and end-to-end latency histograms, and the engine's gauges
// (running / waiting requests, KV blocks, preemptions).
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace spear::serve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  std::string render(const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t n_ = 0;
};

class Metrics {
 public:
  Metrics();
  void request_done(const std::string& outcome, int prompt_tokens, int completion_tokens, double e2e_seconds);
  void first_token(double seconds);
  void inter_token(double seconds);
  void rejected(int status);  // a request refused before it reached the engine
  std::string render(const EngineStats& engine) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> outcomes_;
  std::map<int, uint64_t> rejected_;
  uint64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  Histogram ttft_, itl_, e2e_;
};

}  // namespace spear::serve
