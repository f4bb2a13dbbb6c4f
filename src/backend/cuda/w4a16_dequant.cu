// W4 → bf16 dequantization of one matrix in the GPU layout (w4a16_gemm.h), for prefill-sized GEMMs: from a few
// hundred tokens on, dequantizing the weights once into a scratch matrix and running cuBLAS BF16 on the tensor
// cores beats the mma.sync W4 kernel (which re-dequantizes every weight for every 128-token chunk); the extra
// traffic (2 bytes written and read back per weight) is small against that GEMM's arithmetic.
//
// One warp per (16-row tile, 64-column k-block): each lane turns its 128-bit word of codes (the mma fragment
// order) into 32 weights in shared memory, then the warp writes the 16 × 64 block out as whole 128-byte rows.
#include <cstdint>

#include "backend/cuda/pdl.cuh"
#include "backend/cuda/w4a16_gemm.h"

namespace spear::cuda {

namespace {

constexpr int kWarps = 8;

__global__ void __launch_bounds__(kWarps * 32) w4a16_dequant_kernel(const W4Device w, __nv_bfloat16* __restrict__ out) {
  pdl_enter();  // out may still be read by the previous GEMM
  __shared__ __align__(16) __nv_bfloat16 tile[kWarps][16][64 + 8];  // +8: rows 16 bytes apart mod 128
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kblocks = w.k_pad / 64;
  const int kb = blockIdx.x * kWarps + warp, t16 = blockIdx.y;
  if (kb >= kblocks) return;  // warp-uniform; no block-wide barrier below
  const uint4 codes = reinterpret_cast<const uint4*>(w.q)[(size_t(t16) * kblocks + kb) * 32 + lane];
  const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
  const int g = lane >> 2, t = lane & 3;
  const int gsz = w.group_size > 0 ? w.group_size : w.k_pad;
  for (int half = 0; half < 2; ++half) {  // rows g (fragment registers i = 0, 2) and g + 8 (i = 1, 3)
    const int rl = g + 8 * half, row = t16 * 16 + rl;
    for (int j = 0; j < 4; ++j) {  // k-step j: one group (group sizes are multiples of 16)
      const int grp = min((kb * 64 + 16 * j) / gsz, w.groups - 1);
      const float s = w.scales[size_t(grp) * w.n_pad + row];
      const float z = float(int(w.zeros[size_t(grp) * w.n_pad + row]) - 0x4300);
      for (int hi = 0; hi < 2; ++hi) {  // columns 16j + 2t + 8 · hi + {0, 1}
        const int i = half + 2 * hi, cl = 16 * j + 2 * t + 8 * hi;
        const float q0 = float((words[j] >> (4 * i)) & 15u), q1 = float((words[j] >> (16 + 4 * i)) & 15u);
        *reinterpret_cast<__nv_bfloat162*>(&tile[warp][rl][cl]) = __floats2bfloat162_rn(s * (q0 - z), s * (q1 - z));
      }
    }
  }
  __syncwarp();
  // 16 rows × 128 bytes: lane (r, s) writes row 4 · it + r / 8's 16-byte segment s.
  const int c0 = kb * 64;
  for (int it = 0; it < 4; ++it) {
    const int rl = it * 4 + (lane >> 3), seg = lane & 7, row = t16 * 16 + rl, col = c0 + seg * 8;
    if (row >= w.n) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(&tile[warp][rl][seg * 8]);
    __nv_bfloat16* dst = out + size_t(row) * w.k + col;
    if (col + 8 <= w.k && (w.k % 8) == 0) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
      for (int c = 0; c < 8 && col + c < w.k; ++c) dst[c] = e[c];
    }
  }
}

}  // namespace

void w4a16_dequantize(const W4Device& w, __nv_bfloat16* out, cudaStream_t stream) {
  if (w.n <= 0 || w.k <= 0) return;
  const dim3 grid((w.k_pad / 64 + kWarps - 1) / kWarps, w.n_pad / 16);
  launch_kernel(w4a16_dequant_kernel, grid, dim3(kWarps * 32), 0, stream, w, out);
  SPEAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace spear::cuda
