#pragma once
// KV-cache accounting in blocks of kKvBlockTokens positions (the CUDA cache's page size): the serving engine
// admits, grows and preempts requests against this budget, so that a request never meets a full cache in the
// middle of a forward pass. Each KV slot (one running sequence) holds ceil(length / kKvBlockTokens) blocks.
#include <cstddef>
#include <vector>

namespace spear {

inline constexpr int kKvBlockTokens = 16;

class KvBlockAllocator {
 public:
  KvBlockAllocator(int total_blocks, int n_slots);
  static int blocks_for(int tokens) { return (tokens + kKvBlockTokens - 1) / kKvBlockTokens; }
  int total() const { return total_; }
  int free() const { return free_; }
  int used() const { return total_ - free_; }
  int held(int slot) const { return held_.at(size_t(slot)); }
  // Extra blocks `slot` needs to hold `tokens` positions (0 when it already holds enough).
  int needed(int slot, int tokens) const;
  // Grows `slot` to hold `tokens` positions; false (and nothing changes) when the free blocks do not suffice.
  bool reserve(int slot, int tokens);
  void release(int slot);  // every block of the slot back to the free pool

 private:
  int total_, free_;
  std::vector<int> held_;
};

}  // namespace spear
