#pragma once
// CUDA error handling and device discovery. Errors become spear::Error with the call site, so a missing
// driver or an out-of-memory on the GPU is a clear message, never a crash.
#include <atomic>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "core/error.h"

namespace spear::cuda {

#define SPEAR_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                  \
    cudaError_t err_ = (expr);                                                                          \
    if (err_ != cudaSuccess)                                                                            \
      ::spear::fail("CUDA error at {}:{}: {} ({})", __FILE__, __LINE__, cudaGetErrorString(err_), #expr); \
  } while (0)

struct DeviceInfo {
  int index = 0;
  std::string name;
  int sm_count = 0;
  int major = 0, minor = 0;
  size_t memory_bytes = 0;
  size_t l2_bytes = 0;
};

// Number of usable GPUs; 0 when there is no driver or no device (never throws).
int device_count();
DeviceInfo device_info(int index);

// Sets the current device for the scope and restores the previous one (the P2P and tensor-parallel buffers are
// allocated on each rank's device from one thread).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    SPEAR_CUDA_CHECK(cudaGetDevice(&prev_));
    if (device != prev_) SPEAR_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(prev_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

// Opt a kernel into more than 48 KiB of dynamic shared memory, once per device. `done` is the instantiation's
// own flag set (a static of the caller's template).
template <typename Kernel>
inline void ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  SPEAR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done.fetch_or(bit, std::memory_order_release);
}

// v rounded up to a multiple of a (buffer layouts).
constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace spear::cuda
