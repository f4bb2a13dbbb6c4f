#include "backend/cuda/w4_prefetch_chain.h"

#include <algorithm>

namespace spear::cuda {

const W4Prefetch* W4PrefetchChain::prefetch(const W4Device* w, int count) {
  if (budget_ == 0 || count < 1 || !w[0].q) return nullptr;
  const void* key = w[0].q;
  Node& node = nodes_[key];
  if (node.regions.empty()) {
    for (int i = 0; i < count; ++i) {
      const W4Device& d = w[i];
      node.regions.emplace_back(d.q, uint32_t(size_t(d.n_pad) * d.k_pad / 2));
      node.regions.emplace_back(d.scales, uint32_t(size_t(d.groups) * d.n_pad * sizeof(float)));
      node.regions.emplace_back(d.zeros, uint32_t(size_t(d.groups) * d.n_pad * sizeof(uint16_t)));
    }
  }
  if (last_ && last_ != key) nodes_[last_].next = key;
  last_ = key;

  node.pf = W4Prefetch{};
  size_t left = budget_;
  const void* n = node.next;
  for (int hop = 0; hop < hops_ && n && n != key && left > 0; ++hop) {
    const auto it = nodes_.find(n);
    if (it == nodes_.end()) break;
    for (const auto& [ptr, bytes] : it->second.regions) {
      if (node.pf.count == kW4MaxPrefetch || left < 16) break;
      const uint32_t take = uint32_t(std::min<size_t>(bytes, left)) & ~15u;
      if (!ptr || take == 0) continue;
      node.pf.ptr[node.pf.count] = ptr;
      node.pf.bytes[node.pf.count++] = take;
      left -= take;
    }
    n = it->second.next;
  }
  return node.pf.count ? &node.pf : nullptr;
}

}  // namespace spear::cuda
