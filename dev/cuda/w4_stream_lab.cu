// Kernel playground (llm.c dev/cuda style, not part of the build): what limits the W4 decode kernel's weight
// streaming rate? Each variant reads the same bytes of a W4 weight matrix in the decode kernel's layout (16-row
// tiles, each tile's 64-column k-blocks contiguous, 512 bytes per k-block), from rotating copies (> 4 × L2,
// so every launch reads DRAM), timed back to back with CUDA events:
//   read  grid-stride 16-byte loads of the whole matrix: the read ceiling for this size
//   ring  the kernel's access pattern: warp = (tile, k-slice), a register ring of P loads in flight, XOR-reduced
//   mma   ring + the kernel's dequantization and one m16n8k16 MMA chain per warp (T = 1, per channel)
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Isrc dev/cuda/w4_stream_lab.cu -o /tmp/lab && /tmp/lab
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/cuda/w4a16_common.cuh"

#include "common.h"

using namespace spear::cuda::w4_detail;

__global__ void read_all(const uint4* p, size_t n16, unsigned* out) {
  uint32_t acc = 0;
  const uint64_t pol = evict_first_policy();
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n16; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = ld_weights(p + i, pol);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) out[0] = acc;
}

// Dequantization without the zero-point add: the bf16 pairs {128 + q}; the zero point is folded into the
// epilogue as −(128 + z) · Σx (Σx per token and group, computed once for all rows).
__device__ __forceinline__ void raw_fragment(uint32_t w, uint32_t (&a)[4]) {
  a[0] = nibbles_to_bf16x2(w);
  a[1] = nibbles_to_bf16x2(w >> 4);
  a[2] = nibbles_to_bf16x2(w >> 8);
  a[3] = nibbles_to_bf16x2(w >> 12);
}

// Modes: 0 ring only (XOR), 1 dequant + one MMA chain, 2 two MMA chains (even / odd k-steps),
// 3 two chains without the zero-point add (raw_fragment).
// CTA = 8 warps = R tiles × KS k-slices; gridDim.x = tiles / R, gridDim.y = S further k-splits.
template <int P, int kMode, int kMinBlocks>
__global__ void __launch_bounds__(256, kMinBlocks) ring_kernel(const uint4* q, int n_tiles, int kblocks, int R,
                                                               int kbw, unsigned* out) {
  __shared__ __align__(16) __nv_bfloat16 xs[8][72];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int KS = 8 / R, rsub = warp % R, ks = warp / R;
  const int tile = blockIdx.x * R + rsub;
  const int kb0 = (blockIdx.y * KS + ks) * kbw, kb1 = min(kblocks, kb0 + kbw);
  if (threadIdx.x < 8 * 72 / 8) reinterpret_cast<uint4*>(xs)[threadIdx.x] = make_uint4(0, 0, 0, 0);
  __syncthreads();
  if (tile >= n_tiles || kb0 >= kb1) return;
  const uint64_t pol = evict_first_policy();
  const uint4* wq = q + size_t(tile) * kblocks * 32 + lane;
  uint4 ring[P];
#pragma unroll
  for (int i = 0; i < P; ++i) ring[i] = kb0 + i < kb1 ? ld_weights(wq + size_t(kb0 + i) * 32, pol) : make_uint4(0, 0, 0, 0);
  uint32_t acc = 0;
  float c[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  const uint32_t xa = smem_u32(&xs[lane & 7][((lane >> 3) & 1) * 8]);
  for (int kb = kb0; kb < kb1; kb += P) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int b = kb + i;
      if (b < kb1) {
        if constexpr (kMode > 0) {
          const uint32_t ws[4] = {ring[i].x, ring[i].y, ring[i].z, ring[i].w};
#pragma unroll
          for (int st = 0; st < 4; ++st) {
            uint32_t a[4], b0, b1;
            if constexpr (kMode == 3) raw_fragment(ws[st], a);
            else dequant_fragment(ws[st], 0xC300C300u, 0xC300C300u, a);
            ldmatrix_x2(xa + st * 32, b0, b1);
            mma_bf16(c[kMode == 1 ? 0 : st & 1], a, b0, b1);
          }
        } else {
          acc ^= ring[i].x ^ ring[i].y ^ ring[i].z ^ ring[i].w;
        }
        if (b + P < kb1) ring[i] = ld_weights(wq + size_t(b + P) * 32, pol);
      }
    }
  }
  float t = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) t += c[0][j] + c[1][j];
  if (acc == 0x9E3779B9u || t == 1234.5f) out[0] = acc;
}

struct Shape {
  const char* name;
  int n, k;
};

// lab                  every shape and variant
// lab SHAPE MMA R S P   one variant of one shape (for ncu)
int main(int argc, char** argv) {
  const bool one = argc == 6;
  const int o_shape = one ? std::atoi(argv[1]) : -1, o_mma = one ? std::atoi(argv[2]) : -1,
            o_r = one ? std::atoi(argv[3]) : -1, o_s = one ? std::atoi(argv[4]) : -1, o_p = one ? std::atoi(argv[5]) : -1;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  unsigned* out;
  CK(cudaMalloc(&out, 16));
  const Shape shapes[] = {{"8b-down", 4096, 14336}, {"8b-gate", 14336, 4096}, {"8b-gate+up", 28672, 4096},
                          {"8b-q/o", 4096, 4096}, {"1b-gate", 8192, 2048}, {"1b-q/o", 2048, 2048}};
  std::printf("%d SMs, L2 %d MB\n", sms, l2 >> 20);
  std::printf("%-11s %-26s %9s %9s\n", "shape", "variant", "us", "GB/s");
  for (int si = 0; si < 6; ++si) {
    const Shape& s = shapes[si];
    if (one && si != o_shape) continue;
    const size_t bytes = size_t(s.n) * s.k / 2;
    const RotatingCopies weights(bytes, l2);
    const int n_tiles = s.n / 16, kblocks = s.k / 64;
    auto timeit = [&](auto&& launch) { return weights.time(st, launch); };
    auto report = [&](const char* v, double us) { std::printf("%-11s %-26s %9.2f %9.0f\n", s.name, v, us, bytes / us / 1e3); };
    for (int blocks : {sms, 2 * sms, 4 * sms, 8 * sms}) {
      if (one) break;
      char v[64];
      std::snprintf(v, sizeof v, "read grid %d x 256", blocks);
      report(v, timeit([&](const uint4* p) { read_all<<<blocks, 256, 0, st>>>(p, bytes / 16, out); }));
    }
    using Fn = void (*)(const uint4*, int, int, int, int, unsigned*);
    struct Var {
      const char* name;
      int mode, P, mb;
      Fn fn;
    };
    const Var vars[] = {{"ring", 0, 8, 2, ring_kernel<8, 0, 2>},   {"ring", 0, 16, 2, ring_kernel<16, 0, 2>},
                        {"mma1", 1, 8, 2, ring_kernel<8, 1, 2>},   {"mma1", 1, 16, 2, ring_kernel<16, 1, 2>},
                        {"mma2", 2, 8, 2, ring_kernel<8, 2, 2>},   {"mma2", 2, 16, 2, ring_kernel<16, 2, 2>},
                        {"fold", 3, 8, 2, ring_kernel<8, 3, 2>},   {"fold", 3, 16, 2, ring_kernel<16, 3, 2>},
                        {"fold3", 3, 8, 3, ring_kernel<8, 3, 3>},  {"fold4", 3, 8, 4, ring_kernel<8, 3, 4>},
                        {"mma2-3", 2, 8, 3, ring_kernel<8, 2, 3>}, {"fold4", 3, 4, 4, ring_kernel<4, 3, 4>}};
    for (const Var& var : vars)
      for (int R : {1, 2, 4, 8})
        for (int S : {1, 2, 4}) {
          if (one && (var.mode != o_mma || R != o_r || S != o_s || var.P != o_p)) continue;
          const int KS = 8 / R;
          const int kbw = (kblocks + KS * S - 1) / (KS * S);
          if (S > 1 && (S - 1) * KS * kbw >= kblocks) continue;
          const dim3 grid((n_tiles + R - 1) / R, S);
          char v[64];
          std::snprintf(v, sizeof v, "%s/%d R%d S%d P%d (%d)", var.name, var.mb, R, S, var.P, grid.x * grid.y);
          report(v, timeit([&](const uint4* p) { var.fn<<<grid, 256, 0, st>>>(p, n_tiles, kblocks, R, kbw, out); }));
        }
  }
  return 0;
}
