#pragma once
// Per-op GPU time of the CUDA backend, for finding where a decode step goes (SPEAR_CUDA_PROFILE=1): every op
// is bracketed by a pair of CUDA events, graphs are not used (each op is timed eagerly), and a table of calls,
// total and mean time per op is printed to stderr when the backend is destroyed. Off: one branch per op.
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace spear::cuda {

class OpProfiler {
 public:
  explicit OpProfiler(cudaStream_t stream);
  ~OpProfiler();
  bool enabled() const { return enabled_; }

  class Scope {
   public:
    Scope(OpProfiler* p, const char* name);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
    size_t index_ = 0;
  };
  Scope scope(const char* name) {
    ++ops_;
    return Scope(enabled_ ? this : nullptr, name);
  }
  // Ops begun so far (every backend op takes a scope, profiling or not): tells whether two launches were adjacent.
  uint64_t ops() const { return ops_; }
  // Host-side time (e.g. waiting in a download), measured with the steady clock.
  void add_host(const char* name, double ms);
  std::string report();

 private:
  struct Pending {
    const char* name;
    cudaEvent_t start, stop;
  };
  void flush();
  bool enabled_ = false;
  uint64_t ops_ = 0;
  cudaStream_t stream_;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  struct Stat {
    long calls = 0;
    double ms = 0;
  };
  std::map<std::string, Stat> gpu_, host_;
};

}  // namespace spear::cuda
