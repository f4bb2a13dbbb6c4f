// Kernel playground (llm.c dev/cuda style, not part of the build): what does a dependent launch cost inside a
// CUDA graph on this GPU, and what does a grid-wide barrier cost inside one persistent kernel? A W4 decode step
// of the 1B model is ~145 dependent launches that move ~1 GB; this says how much of the step is launches.
//
//   chain     a graph of N dependent kernels of G CTAs x 256 threads; each reads one word the previous kernel
//             wrote and writes the next (the minimum real dependency)
//   chain+pdl the same launched with programmatic stream serialization, griddepcontrol.wait first (pdl_enter)
//   barrier   one persistent kernel of G CTAs (G <= one per SM) crossing N grid barriers: an arrival counter
//             (red.release.gpu) and a spin on it (ld.acquire.gpu), the same dependency per crossing
//
//   nvcc -std=c++17 -O3 -arch=sm_90a dev/cuda/launch_lab.cu -o /tmp/launchlab && /tmp/launchlab
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#include "common.h"

__global__ void chain_kernel(unsigned* buf, int i, int pdl) {
  if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (blockIdx.x == 0 && threadIdx.x == 0) buf[i + 1] = buf[i] + 1;
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__global__ void barrier_kernel(unsigned* counter, unsigned* buf, int n) {
  for (int i = 0; i < n; ++i) {
    if (blockIdx.x == 0 && threadIdx.x == 0) buf[i + 1] = buf[i] + 1;
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      const unsigned target = unsigned(i + 1) * gridDim.x;
      while (ld_acquire(counter) < target) {
      }
    }
    __syncthreads();
  }
}

static float time_graph(cudaGraphExec_t exec, cudaStream_t s, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaGraphLaunch(exec, s));
  CK(cudaStreamSynchronize(s));
  CK(cudaEventRecord(a, s));
  for (int r = 0; r < reps; ++r) CK(cudaGraphLaunch(exec, s));
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms / reps;
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  constexpr int N = 256, reps = 20;
  unsigned *buf, *counter;
  CK(cudaMalloc(&buf, (N + 2) * sizeof(unsigned)));
  CK(cudaMalloc(&counter, sizeof(unsigned)));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::printf("%-12s %6s %12s\n", "what", "CTAs", "us each");
  const int grids[] = {1, sms, 4 * sms};
  for (int pdl = 0; pdl < 2; ++pdl)
    for (int G : grids) {
      cudaGraph_t g;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < N; ++i) {
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(G);
        cfg.blockDim = dim3(256);
        cfg.stream = s;
        cudaLaunchAttribute attr[1];
        if (pdl) {
          attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
          attr[0].val.programmaticStreamSerializationAllowed = 1;
          cfg.attrs = attr;
          cfg.numAttrs = 1;
        }
        CK(cudaLaunchKernelEx(&cfg, chain_kernel, buf, i, pdl));
      }
      CK(cudaStreamEndCapture(s, &g));
      cudaGraphExec_t exec;
      CK(cudaGraphInstantiate(&exec, g, 0));
      std::printf("%-12s %6d %12.2f\n", pdl ? "chain+pdl" : "chain", G, 1000.f * time_graph(exec, s, reps) / N);
      CK(cudaGraphExecDestroy(exec));
      CK(cudaGraphDestroy(g));
    }
  for (int G : {sms / 2, sms}) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float best = 1e9f;
    for (int r = 0; r < 5; ++r) {
      CK(cudaMemsetAsync(counter, 0, sizeof(unsigned), s));
      CK(cudaEventRecord(a, s));
      barrier_kernel<<<G, 256, 0, s>>>(counter, buf, N);
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, a, b));
      if (ms < best) best = ms;
    }
    std::printf("%-12s %6d %12.2f\n", "barrier", G, 1000.f * best / N);
  }
  return 0;
}
