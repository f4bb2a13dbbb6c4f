// The overlapped EC path's kernels (ec_overlap.h). The gate: one warp per token, z and the hidden layer in shared
// memory, each lane a few of the gate's dot products. The term: each thread owns one or two output columns for a
// block of tokens, its rows of B in registers (loaded before griddepcontrol.wait: they are constants), g ⊙ z of
// the block's tokens in shared memory; the y loads of four tokens are issued together so that the read-modify-write
// of a memory-bound matrix keeps several loads in flight per thread. The block's slice of B (its columns' rows,
// contiguous in B) comes in through shared memory, rank-major: read straight into registers, every thread walked
// its own 64-128-byte line, one L1 wavefront per thread and load, which made the add of a 2048-column output at 512
// tokens take 27 µs under ncu (more than the q_proj GEMM it follows).
#include <atomic>
#include <algorithm>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_overlap.h"
#include "backend/cuda/pdl.cuh"
#include "core/error.h"

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kGateWarps = 4;

__global__ void __launch_bounds__(kGateWarps * 32) gate_rows_kernel(const float* z, const float* __restrict__ W1,
                                                                    const float* __restrict__ b1,
                                                                    const float* __restrict__ W2,
                                                                    const float* __restrict__ b2, float* zg, int T,
                                                                    int r, int w) {
  extern __shared__ float smem[];  // per warp: z [r], then h [w]
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  float* zs = smem + warp * (r + w);
  float* hs = zs + r;
  pdl_enter();
  for (int t = int(blockIdx.x) * kGateWarps + warp; t < T; t += int(gridDim.x) * kGateWarps) {
    for (int j = lane; j < r; j += 32) zs[j] = z[size_t(t) * r + j];
    __syncwarp();
    for (int i = lane; i < w; i += 32) {
      const float* row = W1 + size_t(i) * r;
      float s = 0.f;
      for (int j = 0; j < r; ++j) s = fmaf(row[j], zs[j], s);
      const float v = s + b1[i];
      hs[i] = v / (1.f + expf(-v));
    }
    __syncwarp();
    for (int j = lane; j < r; j += 32) {
      const float* row = W2 + size_t(j) * w;
      float s = 0.f;
      for (int i = 0; i < w; ++i) s = fmaf(row[i], hs[i], s);
      zg[size_t(t) * r + j] = (1.f + tanhf(s + b2[j])) * zs[j];  // zg may be z: this row was read into zs
    }
    __syncwarp();  // zs and hs are the next token's
  }
}

constexpr int kExpandThreads = 256;
constexpr int kTokenBatch = 4;  // y loads in flight per thread

// The staged slice of B for rank R and C columns per thread: R rows of the block's columns, padded by 4 floats so
// that a thread's float2 stays aligned and the transposing stores spread over the banks.
template <int C>
constexpr int staged_row() {
  return kExpandThreads * C + 4;
}
template <int R, int C>
constexpr size_t staged_bytes() {
  return R > 0 ? size_t(R) * staged_row<C>() * sizeof(float) : 0;
}

// R > 0: the rank, B's rows in registers; R == 0: any rank r, B read through L1 per token. C columns per thread.
// Shared memory: the staged B slice (R > 0), then g ⊙ z of the block's tokens [tokens][rank].
template <int R, int C>
__global__ void __launch_bounds__(kExpandThreads) expand_add_kernel(bf16* y, const float* zg,
                                                                    const float* __restrict__ B, int T, int n,
                                                                    int r, int tokens_per_block) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* zs = smem + staged_bytes<R, C>() / sizeof(float);
  const int rank = R > 0 ? R : r;
  const int jb = int(blockIdx.x) * kExpandThreads * C;
  const int j0 = jb + int(threadIdx.x) * C;
  const int t0 = int(blockIdx.y) * tokens_per_block, t1 = min(T, t0 + tokens_per_block);
  float b[C][R > 0 ? R : 1];
  if constexpr (R > 0) {
    static_assert(R % 4 == 0, "B's rows are staged in 16-byte pieces");
    constexpr int WS = staged_row<C>();
    const int cols = min(kExpandThreads * C, n - jb);
    const float4* src = reinterpret_cast<const float4*>(B + size_t(jb) * R);  // 16-byte aligned: R % 4 == 0
    for (int q = int(threadIdx.x); q < cols * (R / 4); q += kExpandThreads) {
      const float4 v = __ldg(src + q);
      const int col = q / (R / 4), i = q % (R / 4) * 4;
      smem[(i + 0) * WS + col] = v.x;
      smem[(i + 1) * WS + col] = v.y;
      smem[(i + 2) * WS + col] = v.z;
      smem[(i + 3) * WS + col] = v.w;
    }
    __syncthreads();
    const int lc = int(threadIdx.x) * C;  // columns of this thread beyond n are never stored
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if constexpr (C == 2) {
        const float2 v = *reinterpret_cast<const float2*>(smem + i * WS + lc);
        b[0][i] = v.x, b[1][i] = v.y;
      } else {
        b[0][i] = smem[i * WS + lc];
      }
    }
  }
  pdl_wait();
  for (int k = int(threadIdx.x); k < (t1 - t0) * rank; k += kExpandThreads) zs[k] = zg[size_t(t0) * rank + k];
  __syncthreads();
  if (j0 >= n) return;
  for (int tb = t0; tb < t1; tb += kTokenBatch) {
    const int nt = min(kTokenBatch, t1 - tb);
    float yv[kTokenBatch][C];
#pragma unroll
    for (int u = 0; u < kTokenBatch; ++u) {
      if (u >= nt) break;
      const bf16* yr = y + size_t(tb + u) * n + j0;
      if constexpr (C == 2) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(yr));
        yv[u][0] = f.x, yv[u][1] = f.y;
      } else {
        yv[u][0] = __bfloat162float(yr[0]);
      }
    }
#pragma unroll
    for (int u = 0; u < kTokenBatch; ++u) {
      if (u >= nt) break;
      const float* zt = zs + (tb + u - t0) * rank;
      float acc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        acc[c] = 0.f;
        if constexpr (R > 0) {
#pragma unroll
          for (int i = 0; i < R; ++i) acc[c] = fmaf(b[c][i], zt[i], acc[c]);
        } else {
          const float* row = B + size_t(j0 + c) * r;
          for (int i = 0; i < r; ++i) acc[c] = fmaf(__ldg(row + i), zt[i], acc[c]);
        }
      }
      bf16* yr = y + size_t(tb + u) * n + j0;
      if constexpr (C == 2)
        *reinterpret_cast<__nv_bfloat162*>(yr) = __floats2bfloat162_rn(yv[u][0] + acc[0], yv[u][1] + acc[1]);
      else
        yr[0] = __float2bfloat16(yv[u][0] + acc[0]);
    }
  }
}

template <int R, int C>
void launch_expand(bf16* y, const float* zg, const float* B, int T, int n, int r, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_done{0};
  constexpr size_t kZsMaxBytes = 48 * 1024;
  ensure_smem(expand_add_kernel<R, C>, staged_bytes<R, C>() + kZsMaxBytes, smem_done);
  const int bx = (n + kExpandThreads * C - 1) / (kExpandThreads * C);
  // About two blocks per SM of an H200 in all (each block stages its slice of B once), at least four tokens per
  // block and at most 32; the shared g ⊙ z within 48 KB. (Four and eight blocks per SM ran the same within 1%:
  // 1B prefill, bench/results/cuda-h200-prefillgraph/call4-ab.)
  int tpb = std::clamp(int((long long)T * bx / 264), std::min(T, 4), 32);
  tpb = std::max(1, std::min(tpb, int(kZsMaxBytes / sizeof(float)) / r));
  const int by = (T + tpb - 1) / tpb;
  SPEAR_CHECK(by <= 65535, "ec_expand_add_bf16: {} tokens exceed the grid", T);
  launch_kernel(expand_add_kernel<R, C>, dim3(unsigned(bx), unsigned(by)), dim3(kExpandThreads),
                staged_bytes<R, C>() + size_t(tpb) * r * sizeof(float), stream, y, zg, B, T, n, r, tpb);
}

}  // namespace

void ec_gate_rows_f32(const float* z, const float* W1, const float* b1, const float* W2, const float* b2, float* zg,
                      int T, int r, int w, cudaStream_t stream) {
  if (T == 0) return;
  SPEAR_CHECK(r >= 1 && w >= 1 && r + w <= 3072, "ec_gate_rows_f32: rank {} and gate width {} not supported", r, w);
  const int blocks = std::min((T + kGateWarps - 1) / kGateWarps, 65535);
  launch_kernel(gate_rows_kernel, dim3(unsigned(blocks)), dim3(kGateWarps * 32),
                size_t(kGateWarps) * (r + w) * sizeof(float), stream, z, W1, b1, W2, b2, zg, T, r, w);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void ec_expand_add_bf16(bf16* y, const float* zg, const float* B, int T, int n, int r, cudaStream_t stream) {
  if (T == 0 || n == 0) return;
  SPEAR_CHECK(r >= 1 && r <= 12288, "ec_expand_add_bf16: rank {} not supported", r);
  // Two columns per thread where every row of y starts 4-byte aligned.
  const bool pairs = n % 2 == 0 && reinterpret_cast<uintptr_t>(y) % 4 == 0;
  if (r == 8 && pairs)
    launch_expand<8, 2>(y, zg, B, T, n, r, stream);
  else if (r == 16 && pairs)
    launch_expand<16, 2>(y, zg, B, T, n, r, stream);
  else if (r == 32 && pairs)
    launch_expand<32, 2>(y, zg, B, T, n, r, stream);
  else if (r == 64)
    launch_expand<64, 1>(y, zg, B, T, n, r, stream);
  else if (pairs)
    launch_expand<0, 2>(y, zg, B, T, n, r, stream);
  else
    launch_expand<0, 1>(y, zg, B, T, n, r, stream);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
