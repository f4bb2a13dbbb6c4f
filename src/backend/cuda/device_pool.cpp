#include "backend/cuda/device_pool.h"

#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_check.h"

namespace spear::cuda {

DevicePool::~DevicePool() {
  for (void* p : all_) cudaFree(p);
}

// Classes: multiples of 4 KiB up to 64 KiB, then powers of two up to 1 MiB, then multiples of 1 MiB: at most
// 1/16 wasted above 64 KiB, few distinct classes for the shapes of one model.
size_t DevicePool::size_class(size_t bytes) {
  if (bytes <= (size_t(64) << 10)) return (bytes + 4095) / 4096 * 4096;
  if (bytes <= (size_t(1) << 20)) {
    size_t c = size_t(64) << 10;
    while (c < bytes) c <<= 1;
    return c;
  }
  const size_t mib = size_t(1) << 20;
  return (bytes + mib - 1) / mib * mib;
}

std::shared_ptr<void> DevicePool::alloc(size_t bytes) {
  size_t cls = size_class(bytes ? bytes : 1);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The smallest free block of this class or of a larger one up to twice its size: a new, smaller iteration size
    // then reuses what a larger one left rather than reserving more with cudaMalloc (on the H200 serving runs this
    // changed no iteration time, but it bounds the pool's growth; SPEAR_POOL_EXACT=1 takes the class only).
    static const bool exact = [] {
      const char* e = std::getenv("SPEAR_POOL_EXACT");
      return e && std::string(e) == "1";
    }();
    for (auto it = free_.lower_bound(cls); it != free_.end() && it->first <= (exact ? cls : 2 * cls); ++it) {
      if (it->second.empty()) continue;
      p = it->second.back();
      it->second.pop_back();
      cls = it->first;
      break;
    }
  }
  if (!p) {
    cudaError_t err = cudaMalloc(&p, cls);
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      fail("out of GPU memory: could not allocate {:.1f} MiB for activations ({:.1f} MiB free of {:.1f} MiB)",
           double(cls) / (1 << 20), double(free_b) / (1 << 20), double(total_b) / (1 << 20));
    }
    std::lock_guard<std::mutex> lock(mu_);
    all_.push_back(p);
    reserved_ += cls;
    ++mallocs_;
  }
  std::weak_ptr<DevicePool> self = weak_from_this();
  return std::shared_ptr<void>(p, [self, cls](void* q) {
    if (auto pool = self.lock()) pool->release(q, cls);
  });
}

void DevicePool::release(void* p, size_t cls) {
  std::lock_guard<std::mutex> lock(mu_);
  free_[cls].push_back(p);
}

}  // namespace spear::cuda
