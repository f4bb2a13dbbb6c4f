// Small bf16 kernels of the decoder (elementwise.h). Memory-bound: each kernel moves 16 bytes per thread and
// access when the size and the pointers' alignment allow it, and falls back to narrower accesses otherwise,
// so odd sizes and views at odd offsets stay correct. Arithmetic in fp32, one rounding to bf16 at the end.
#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope_rotate.cuh"
#include "backend/cuda/w4a16_fusion.cuh"  // swiglu_f, shared with the W4 decode kernels' fused x staging

namespace spear::cuda {

namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // grid-stride loops beyond this

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

int grid_for(int64_t work_items) {
  const int64_t b = (work_items + kThreads - 1) / kThreads;
  return int(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// 8 bf16 in a 16-byte word <-> 8 floats.
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const bf162* h = reinterpret_cast<const bf162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  bf162* h = reinterpret_cast<bf162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// ---- gather ------------------------------------------------------------------------------------------------

// One block per output row; Word is the access unit (uint4: 8 bf16, uint32_t: 2, uint16_t: 1).
template <typename Word>
__global__ void gather_rows_kernel(const bf16* __restrict__ table, int64_t cols, const int32_t* __restrict__ ids,
                                   bf16* __restrict__ out) {
  pdl_enter();
  constexpr int kPer = int(sizeof(Word) / sizeof(bf16));
  const int64_t row = blockIdx.x;
  const int64_t words = cols / kPer;
  const Word* src = reinterpret_cast<const Word*>(table + int64_t(ids[row]) * cols);
  Word* dst = reinterpret_cast<Word*>(out + row * cols);
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
}

// ---- add, swiglu -------------------------------------------------------------------------------------------

__global__ void add_kernel(bf16* x, const bf16* y, int64_t n, int64_t n_vec) {
  pdl_enter();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  uint4* xv = reinterpret_cast<uint4*>(x);
  const uint4* yv = reinterpret_cast<const uint4*>(y);
  for (int64_t i = i0; i < n_vec; i += stride) {
    float a[8], b[8];
    unpack8(xv[i], a);
    unpack8(yv[i], b);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] += b[j];
    xv[i] = pack8(a);
  }
  for (int64_t i = n_vec * 8 + i0; i < n; i += stride)
    x[i] = __float2bfloat16_rn(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

// out may alias gate: each element is read before it is written by the same thread (no __restrict__ here).
__global__ void swiglu_kernel(const bf16* gate, const bf16* up, bf16* out, int64_t n, int64_t n_vec) {
  pdl_enter();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint4* gv = reinterpret_cast<const uint4*>(gate);
  const uint4* uv = reinterpret_cast<const uint4*>(up);
  uint4* ov = reinterpret_cast<uint4*>(out);
  for (int64_t i = i0; i < n_vec; i += stride) {
    float g[8], u[8];
    unpack8(gv[i], g);
    unpack8(uv[i], u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = swiglu_f(g[j], u[j]);
    ov[i] = pack8(g);
  }
  for (int64_t i = n_vec * 8 + i0; i < n; i += stride)
    out[i] = __float2bfloat16_rn(swiglu_f(__bfloat162float(gate[i]), __bfloat162float(up[i])));
}

// ---- RoPE --------------------------------------------------------------------------------------------------

// One block per token: cos/sin of its head_dim / 2 angles once into shared memory (sincosf, full range reduction:
// positions of 1e5 and more give angles of 1e5 rad), then every head's pairs. kPairs2: each thread rotates two
// neighbouring pairs (i, i + 1) with bf16x2 accesses; needs half even and a 4-byte aligned x.
template <bool kPairs2>
__global__ void rope_kernel(bf16* x, int n_heads, int head_dim, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq) {
  pdl_enter();
  extern __shared__ float cs_sn[];  // [half] cos, then [half] sin
  const int half = head_dim / 2;
  float* cs = cs_sn;
  float* sn = cs_sn + half;
  const int64_t t = blockIdx.x;
  rope_angles(float(positions[t]), inv_freq, half, cs, sn, threadIdx.x, blockDim.x);
  __syncthreads();
  bf16* xt = x + t * int64_t(n_heads) * head_dim;
  if constexpr (kPairs2) {
    const int per_head = half / 2;
    for (int e = threadIdx.x; e < n_heads * per_head; e += blockDim.x) {
      const int h = e / per_head, i = (e - h * per_head) * 2;
      bf162* p1 = reinterpret_cast<bf162*>(xt + int64_t(h) * head_dim + i);
      bf162* p2 = reinterpret_cast<bf162*>(xt + int64_t(h) * head_dim + i + half);
      rope_rotate2(*p1, *p2, cs[i], cs[i + 1], sn[i], sn[i + 1], *p1, *p2);
    }
  } else {
    for (int e = threadIdx.x; e < n_heads * half; e += blockDim.x) {
      const int h = e / half, i = e - h * half;
      bf16* v = xt + int64_t(h) * head_dim;
      rope_rotate(__bfloat162float(v[i]), __bfloat162float(v[i + half]), cs[i], sn[i], v[i], v[i + half]);
    }
  }
}

// ---- conversions -------------------------------------------------------------------------------------------

__global__ void f32_to_bf16_kernel(const float* __restrict__ in, bf16* __restrict__ out, int64_t n, int64_t n_vec) {
  pdl_enter();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = i0; i < n_vec; i += stride) {  // 4 floats (16 B) -> 4 bf16 (8 B)
    const float4 v = reinterpret_cast<const float4*>(in)[i];
    uint2 w;
    bf162* h = reinterpret_cast<bf162*>(&w);
    h[0] = __floats2bfloat162_rn(v.x, v.y);
    h[1] = __floats2bfloat162_rn(v.z, v.w);
    reinterpret_cast<uint2*>(out)[i] = w;
  }
  for (int64_t i = n_vec * 4 + i0; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void bf16_to_f32_kernel(const bf16* __restrict__ in, float* __restrict__ out, int64_t n, int64_t n_vec) {
  pdl_enter();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = i0; i < n_vec; i += stride) {  // 4 bf16 (8 B) -> 4 floats (16 B)
    const uint2 w = reinterpret_cast<const uint2*>(in)[i];
    const bf162* h = reinterpret_cast<const bf162*>(&w);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    reinterpret_cast<float4*>(out)[i] = make_float4(a.x, a.y, b.x, b.y);
  }
  for (int64_t i = n_vec * 4 + i0; i < n; i += stride) out[i] = __bfloat162float(in[i]);
}

// ---- argmax ------------------------------------------------------------------------------------------------

constexpr int kArgmaxThreads = 1024;

// (v, i) beats (bv, bi) when larger, or equal with a lower index: the result is the first maximum whatever
// order the elements were visited in. NaN never wins (all comparisons false).
__device__ __forceinline__ void arg_better(float v, int i, float& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

// One block per row. Four independent 16-byte loads per thread in flight (vocabularies of 150k+ floats are
// read by one SM, so memory-level parallelism matters more than anything else here).
__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const float* __restrict__ x, int cols,
                                                                     int32_t* __restrict__ out, bool vec4) {
  pdl_enter();
  const float* xr = x + int64_t(blockIdx.x) * cols;
  float bv = -INFINITY;
  int bi = INT32_MAX;
  int tail = 0;
  if (vec4) {
    const float4* xv = reinterpret_cast<const float4*>(xr);
    const int n4 = cols / 4;
    int j = threadIdx.x;
    for (; j + 3 * kArgmaxThreads < n4; j += 4 * kArgmaxThreads) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = xv[j + u * kArgmaxThreads];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int b = 4 * (j + u * kArgmaxThreads);
        arg_better(v[u].x, b, bv, bi);
        arg_better(v[u].y, b + 1, bv, bi);
        arg_better(v[u].z, b + 2, bv, bi);
        arg_better(v[u].w, b + 3, bv, bi);
      }
    }
    for (; j < n4; j += kArgmaxThreads) {
      const float4 v = xv[j];
      arg_better(v.x, 4 * j, bv, bi);
      arg_better(v.y, 4 * j + 1, bv, bi);
      arg_better(v.z, 4 * j + 2, bv, bi);
      arg_better(v.w, 4 * j + 3, bv, bi);
    }
    tail = n4 * 4;
  }
  for (int j = tail + int(threadIdx.x); j < cols; j += kArgmaxThreads) arg_better(xr[j], j, bv, bi);

#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    arg_better(ov, oi, bv, bi);
  }
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = sv[lane];  // kArgmaxThreads / 32 == 32 entries
    bi = si[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      arg_better(ov, oi, bv, bi);
    }
    if (lane == 0) out[blockIdx.x] = bi == INT32_MAX ? 0 : bi;  // a row of NaNs: index 0, as std::max_element
  }
}
static_assert(kArgmaxThreads / 32 == 32, "the final reduction reads one entry per lane");

}  // namespace

void gather_rows_bf16(const __nv_bfloat16* table, int64_t cols, const int32_t* ids, int n, __nv_bfloat16* out,
                      cudaStream_t stream) {
  if (n <= 0 || cols <= 0) return;
  if (cols % 8 == 0 && aligned(table, 16) && aligned(out, 16)) {
    const int threads = int(cols / 8 >= 256 ? 256 : (cols / 8 + 31) / 32 * 32);
    launch_kernel(gather_rows_kernel<uint4>, n, threads, 0, stream, table, cols, ids, out);
  } else if (cols % 2 == 0 && aligned(table, 4) && aligned(out, 4)) {
    launch_kernel(gather_rows_kernel<uint32_t>, n, 256, 0, stream, table, cols, ids, out);
  } else {
    launch_kernel(gather_rows_kernel<uint16_t>, n, 256, 0, stream, table, cols, ids, out);
  }
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void add_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t n_vec = aligned(x, 16) && aligned(y, 16) ? n / 8 : 0;
  launch_kernel(add_kernel, grid_for(n_vec > 0 ? n_vec : n), kThreads, 0, stream, x, y, n, n_vec);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void swiglu_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out, int64_t n,
                 cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t n_vec = aligned(gate, 16) && aligned(up, 16) && aligned(out, 16) ? n / 8 : 0;
  launch_kernel(swiglu_kernel, grid_for(n_vec > 0 ? n_vec : n), kThreads, 0, stream, gate, up, out, n, n_vec);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void rope_bf16(__nv_bfloat16* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
               cudaStream_t stream) {
  if (T <= 0 || n_heads <= 0) return;
  SPEAR_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope_bf16: head_dim {} must be even and positive", head_dim);
  const int half = head_dim / 2;
  const size_t smem = size_t(head_dim) * sizeof(float);
  SPEAR_CHECK(smem <= 48 * 1024, "rope_bf16: head_dim {} too large", head_dim);
  const int work = n_heads * half;
  const int threads = work >= 256 ? 256 : (work + 31) / 32 * 32;
  if (half % 2 == 0 && aligned(x, 4))
    launch_kernel(rope_kernel<true>, T, threads, smem, stream, x, n_heads, head_dim, positions, inv_freq);
  else
    launch_kernel(rope_kernel<false>, T, threads, smem, stream, x, n_heads, head_dim, positions, inv_freq);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void f32_to_bf16(const float* in, __nv_bfloat16* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t n_vec = aligned(in, 16) && aligned(out, 8) ? n / 4 : 0;
  launch_kernel(f32_to_bf16_kernel, grid_for(n_vec > 0 ? n_vec : n), kThreads, 0, stream, in, out, n, n_vec);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void bf16_to_f32(const __nv_bfloat16* in, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t n_vec = aligned(in, 8) && aligned(out, 16) ? n / 4 : 0;
  launch_kernel(bf16_to_f32_kernel, grid_for(n_vec > 0 ? n_vec : n), kThreads, 0, stream, in, out, n, n_vec);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

void argmax_rows_f32(const float* x, int rows, int cols, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return;
  SPEAR_CHECK(cols > 0, "argmax_rows_f32: {} columns", cols);
  const bool vec4 = cols % 4 == 0 && aligned(x, 16);
  launch_kernel(argmax_rows_kernel, rows, kArgmaxThreads, 0, stream, x, cols, out, vec4);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
