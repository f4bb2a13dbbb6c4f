#include "runtime/kv_blocks.h"

#include <algorithm>

#include "core/error.h"

namespace spear {

KvBlockAllocator::KvBlockAllocator(int total_blocks, int n_slots)
    : total_(total_blocks), free_(total_blocks), held_(size_t(std::max(n_slots, 0)), 0) {
  SPEAR_CHECK(total_blocks > 0 && n_slots > 0, "KV blocks: {} blocks for {} slots", total_blocks, n_slots);
}

int KvBlockAllocator::needed(int slot, int tokens) const {
  return std::max(0, blocks_for(tokens) - held_.at(size_t(slot)));
}

bool KvBlockAllocator::reserve(int slot, int tokens) {
  const int n = needed(slot, tokens);
  if (n > free_) return false;
  free_ -= n;
  held_.at(size_t(slot)) += n;
  return true;
}

void KvBlockAllocator::release(int slot) {
  free_ += held_.at(size_t(slot));
  held_.at(size_t(slot)) = 0;
}

}  // namespace spear
