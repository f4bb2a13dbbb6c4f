#include "backend/cuda/cuda_check.h"

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

}  // namespace spear::cuda
