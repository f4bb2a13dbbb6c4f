// The CUDA backend's graphs: decode steps and prefill iterations captured once per key and KV cache and replayed
// (run_graph), prefill shapes bounded and least recently run dropped first, and every graph dropped when a buffer
// it recorded is replaced.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iterator>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "core/error.h"

namespace spear::cuda {

// An exec still running on the stream is freed when it completes (cudaGraphExecDestroy).
CudaBackend::GraphMap::iterator CudaBackend::erase_graph(GraphMap::iterator it) {
  if (it->second.exec) cudaGraphExecDestroy(it->second.exec);
  return graphs_.erase(it);
}

void CudaBackend::drop_graphs() {
  for (auto it = graphs_.begin(); it != graphs_.end();) it = erase_graph(it);
}

Tensor CudaBackend::run_graph(uint64_t key, const std::function<Tensor()>& body) {
  SPEAR_CHECK(batch_cache_, "run_graph without begin_batch");
  if (prof_->enabled()) return body();  // per-op timing needs eager ops
  const bool prefill = is_prefill_graph_key(key);
  if (prefill && (!prefill_graphs_ || prefill_graph_cap_ <= 0)) return body();
  const std::pair<uint64_t, uint64_t> id{batch_cache_->id(), key};
  if (prefill && !graphs_.count(id)) evict_prefill_graphs();
  Graph& g = graphs_[id];
  g.last_use = ++graph_clock_;
  if (g.runs++ == 0 || g.eager_only) return body();  // eager: cuBLAS heuristics, lazily uploaded tables, tuning
  if (!g.exec) {
    try {
      const auto t0 = std::chrono::steady_clock::now();
      g.exec = capture_graph([&] { g.out = body(); });
      if (verbose_ && prefill)
        std::fprintf(stderr, "cuda: prefill graph of %zu tokens, %zu sequences captured in %.2f ms\n",
                     batch_->tokens.size(), batch_->seqs.size(),
                     std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    } catch (const Error& e) {
      if (!prefill) throw;  // every decode op is meant to be capturable: a failure there is a bug to see
      // A prefill shape whose ops cannot all be recorded (nothing was run): eager for this shape from now on.
      g.eager_only = true;
      g.out = Tensor();
      if (verbose_)
        std::fprintf(stderr, "cuda: prefill of %zu tokens, %zu sequences runs eagerly (%s)\n", batch_->tokens.size(),
                     batch_->seqs.size(), e.what());
      return body();
    }
  }
  SPEAR_CUDA_CHECK(cudaGraphLaunch(g.exec, stream_));
  return g.out;
}

void CudaBackend::set_prefill_graphs(bool on) {
  if (std::getenv("SPEAR_PREFILL_GRAPHS")) return;
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (!on)
    for (auto it = graphs_.begin(); it != graphs_.end();)
      it = is_prefill_graph_key(it->first.second) ? erase_graph(it) : std::next(it);
  prefill_graphs_ = on;
}

size_t CudaBackend::graphs_kept(bool prefill) const {
  size_t n = 0;
  for (const auto& [id, g] : graphs_) n += g.exec && is_prefill_graph_key(id.second) == prefill;
  return n;
}

void CudaBackend::evict_prefill_graphs() {
  for (;;) {
    auto oldest = graphs_.end();
    int kept = 0;
    for (auto it = graphs_.begin(); it != graphs_.end(); ++it) {
      if (!is_prefill_graph_key(it->first.second)) continue;
      ++kept;
      if (oldest == graphs_.end() || it->second.last_use < oldest->second.last_use) oldest = it;
    }
    if (kept < prefill_graph_cap_) return;
    erase_graph(oldest);
  }
}

cudaGraphExec_t CudaBackend::capture_graph(const std::function<void()>& body) {
  cudaGraph_t graph = nullptr;
  SPEAR_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
  capturing_ = true;
  try {
    body();
  } catch (...) {
    capturing_ = false;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  capturing_ = false;
  SPEAR_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  SPEAR_CUDA_CHECK(err);
  return exec;
}

}  // namespace spear::cuda
