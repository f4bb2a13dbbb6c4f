#pragma once
// Which weights a decode W4 launch should prefetch into L2 (W4Prefetch, w4a16_gemm.h): the launches of a step
// come in the same order every step, so the chain learns it as they run (each launch is keyed by the codes of
// its first matrix and remembers the launch that followed it last time) and hands each launch the regions of
// the next two launches, nearest first, up to a byte budget (a fraction of L2: more would evict the weights
// the current launch is reading). A wrong guess costs only DRAM bandwidth, never a wrong result.
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cuda/w4a16_gemm.h"

namespace spear::cuda {

class W4PrefetchChain {
 public:
  // budget_bytes 0: off (prefetch() returns null).
  // hops: how many launches ahead (1 or 2).
  explicit W4PrefetchChain(size_t budget_bytes = 0, int hops = 2) : budget_(budget_bytes), hops_(hops) {}
  size_t budget() const { return budget_; }

  // Records that this launch runs now (after the previous recorded one) and returns what it should prefetch,
  // or null. The pointer stays valid until the next call with the same first matrix.
  const W4Prefetch* prefetch(const W4Device* w, int count);

 private:
  struct Node {
    std::vector<std::pair<const void*, uint32_t>> regions;  // codes, scales, zeros of each matrix
    const void* next = nullptr;
    W4Prefetch pf;
  };
  size_t budget_;
  int hops_;
  std::unordered_map<const void*, Node> nodes_;
  const void* last_ = nullptr;
};

}  // namespace spear::cuda
