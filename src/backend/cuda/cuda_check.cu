#include "backend/cuda/cuda_check.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#include "backend/cuda/pdl.cuh"

namespace spear::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

DeviceInfo device_info(int index) {
  cudaDeviceProp p{};
  SPEAR_CUDA_CHECK(cudaGetDeviceProperties(&p, index));
  DeviceInfo d;
  d.index = index;
  d.name = p.name;
  d.sm_count = p.multiProcessorCount;
  d.major = p.major;
  d.minor = p.minor;
  d.memory_bytes = p.totalGlobalMem;
  d.l2_bytes = size_t(p.l2CacheSize);
  return d;
}

bool pdl_enabled() {
  static const bool env_on = [] {
    const char* e = std::getenv("SPEAR_PDL");
    return !(e && e[0] == '0');
  }();
  if (!env_on) return false;
  // Per device (a process may drive several); host queries only, safe inside a graph capture.
  static std::mutex mu;
  static std::vector<int> major_of;  // by device index, -1 = not asked yet
  int device = 0;
  SPEAR_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (size_t(device) >= major_of.size()) major_of.resize(size_t(device) + 1, -1);
  if (major_of[size_t(device)] < 0)
    SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&major_of[size_t(device)], cudaDevAttrComputeCapabilityMajor, device));
  return major_of[size_t(device)] >= 9;
}

}  // namespace spear::cuda
