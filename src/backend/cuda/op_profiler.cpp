#include "backend/cuda/op_profiler.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "backend/cuda/cuda_check.h"

namespace spear::cuda {

OpProfiler::OpProfiler(cudaStream_t stream) : stream_(stream) {
  const char* e = std::getenv("SPEAR_CUDA_PROFILE");
  enabled_ = e && std::strcmp(e, "0") != 0 && *e;
}

OpProfiler::~OpProfiler() {
  if (!enabled_) return;
  std::string r = report();
  std::fputs(r.c_str(), stderr);
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
}

OpProfiler::Scope::Scope(OpProfiler* p, const char* name) : p_(p) {
  if (!p_) return;
  auto take = [&] {
    cudaEvent_t e;
    if (!p_->free_events_.empty()) {
      e = p_->free_events_.back();
      p_->free_events_.pop_back();
    } else {
      SPEAR_CUDA_CHECK(cudaEventCreate(&e));
    }
    return e;
  };
  Pending pd{name, take(), take()};
  SPEAR_CUDA_CHECK(cudaEventRecord(pd.start, p_->stream_));
  index_ = p_->pending_.size();
  p_->pending_.push_back(pd);
}

OpProfiler::Scope::~Scope() {
  if (!p_) return;
  cudaEventRecord(p_->pending_[index_].stop, p_->stream_);
  if (p_->pending_.size() > 4096) p_->flush();
}

void OpProfiler::flush() {
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (const Pending& pd : pending_) {
    float ms = 0;
    SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, pd.start, pd.stop));
    Stat& s = gpu_[pd.name];
    ++s.calls;
    s.ms += ms;
    free_events_.push_back(pd.start);
    free_events_.push_back(pd.stop);
  }
  pending_.clear();
}

void OpProfiler::add_host(const char* name, double ms) {
  Stat& s = host_[name];
  ++s.calls;
  s.ms += ms;
}

std::string OpProfiler::report() {
  flush();
  double total = 0;
  for (auto& [n, s] : gpu_) total += s.ms;
  std::string out = fmt::format("{:<28} {:>8} {:>11} {:>10} {:>7}\n", "op (SPEAR_CUDA_PROFILE)", "calls", "total ms",
                                "mean us", "share");
  for (auto& [n, s] : gpu_)
    out += fmt::format("{:<28} {:>8} {:>11.3f} {:>10.2f} {:>6.1f}%\n", n, s.calls, s.ms, 1000 * s.ms / double(s.calls),
                       100 * s.ms / total);
  for (auto& [n, s] : host_)
    out += fmt::format("{:<28} {:>8} {:>11.3f} {:>10.2f}   host\n", n, s.calls, s.ms, 1000 * s.ms / double(s.calls));
  return out;
}

}  // namespace spear::cuda
