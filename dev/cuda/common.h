// Shared by the kernel playgrounds of dev/cuda (llm.c's dev/cuda/common.h): stop at the first CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                 \
  do {                                                                        \
    cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                  \
      std::printf("CUDA error %s at %d\n", cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

// A weight matrix of `bytes` in enough copies to cover 4 × L2 and one more, so that every timed call of a rotation
// reads its weights from DRAM. time() is the mean µs of 100 back-to-back launch(copy) calls on st after two
// warm-up rotations.
class RotatingCopies {
 public:
  RotatingCopies(size_t bytes, int l2_bytes)
      : bytes_(bytes), copies_(int((4 * size_t(l2_bytes) + bytes - 1) / bytes) + 1) {
    CK(cudaMalloc(&buf_, bytes_ * copies_));
    CK(cudaMemset(buf_, 0x5a, bytes_ * copies_));
    CK(cudaEventCreate(&e0_));
    CK(cudaEventCreate(&e1_));
  }
  ~RotatingCopies() {
    cudaEventDestroy(e0_);
    cudaEventDestroy(e1_);
    cudaFree(buf_);
  }
  RotatingCopies(const RotatingCopies&) = delete;
  RotatingCopies& operator=(const RotatingCopies&) = delete;

  const uint4* copy(int i) const { return reinterpret_cast<const uint4*>(buf_ + size_t(i % copies_) * bytes_); }

  template <typename Launch>
  double time(cudaStream_t st, Launch&& launch) const {
    for (int i = 0; i < 2 * copies_; ++i) launch(copy(i));
    const int reps = 100;
    CK(cudaEventRecord(e0_, st));
    for (int i = 0; i < reps; ++i) launch(copy(i));
    CK(cudaEventRecord(e1_, st));
    CK(cudaEventSynchronize(e1_));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0_, e1_));
    CK(cudaGetLastError());
    return 1e3 * ms / reps;
  }

 private:
  size_t bytes_;
  int copies_;
  char* buf_ = nullptr;
  cudaEvent_t e0_ = nullptr, e1_ = nullptr;
};
