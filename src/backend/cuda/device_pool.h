#pragma once
// A caching allocator for activations on one device and one stream. The forward pass allocates every
// intermediate anew (model/decoder.cpp); cudaMalloc/cudaFree per op would synchronise the device and cost far
// more than the kernels. Freed blocks go back to a free list by size class and are handed out again in
// stream order, which is safe because every user of the pool works on the same stream. Graph capture needs no
// special case: a capture replays the addresses it recorded, and the pool never returns memory to the driver
// while the backend lives.
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace spear::cuda {

class DevicePool : public std::enable_shared_from_this<DevicePool> {
 public:
  ~DevicePool();
  // A block of at least `bytes` (a free block of its size class or up to twice larger, else a new one of its class);
  // the shared_ptr's deleter returns it to its own class.
  std::shared_ptr<void> alloc(size_t bytes);
  size_t reserved_bytes() const { return reserved_; }
  size_t mallocs() const { return mallocs_; }  // cudaMalloc calls so far

 private:
  static size_t size_class(size_t bytes);
  void release(void* p, size_t cls);
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> blocks
  std::vector<void*> all_;
  size_t reserved_ = 0, mallocs_ = 0;
};

}  // namespace spear::cuda
