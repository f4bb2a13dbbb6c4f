#pragma once
// Quantized (2..8-bit) linear layers on the CPU, computed from the packed weights without materializing a
// dequantized weight matrix.
//
// Two layouts:
//  * PackedQuantWeights: the canonical one, as stored in packages. Bits 2..4 use a 4-bit container:
//    qweight uint8 [out, ceil(in/2)], byte j of row r holds column 2j in the low nibble and column 2j+1 in
//    the high nibble (odd `in`: the last high nibble is 0). Bits 5..8 use an 8-bit container, uint8 [out, in].
//    scales float [out, G], zeros uint8 [out, G]; group of column c is c / group_len; w' = (q - zero) * scale.
//  * CpuQuantWeights: this backend's layout, made once at load time by prepare_cpu_quant():
//    - rows padded to in_pad = round_up(in, 32) columns (padding codes are 0), so every row is a whole number
//      of 32-column blocks and 16-byte loads never cross a row or read past the buffer;
//    - 4-bit container: within each 32-column block of 16 bytes, byte j holds column j in the low nibble and
//      column 16 + j in the high nibble. One 16-byte load + zero-extension to 16 int32 lanes then gives two
//      whole 16-column vectors in column order (`& 15` and `>> 4`), with no cross-lane shuffle; the canonical
//      layout would give even/odd columns and need a permute of x or of the weights in the inner loop;
//    - zs = zero * scale per group precomputed (float), for the decode identity
//      Σ_c (q_c - z)·s·x_c = s·Σ q_c·x_c - (z·s)·Σ x_c, so the inner loop is only q·x;
//    - zeros kept as ints for the GEMM path, which dequantizes tiles exactly as the reference ((q - z) * s).
//
// Kernels (runtime dispatch: AVX-512 / AVX2 / portable C++; forceable for tests and benchmarks):
//  * decode (T <= 8; 9..16 as two passes): GEMV-style, each weight row streamed once for all T tokens, fp32
//    accumulators per token, scale applied per group, zero folded in through per-group sums of x. OpenMP over
//    contiguous row ranges; columns in blocks of 8192/T so the T rows of x stay in L1 across weight rows.
//  * prefill (T > 16): OpenMP over blocks of up to 256 output rows; each block is dequantized (in K-chunks)
//    into a thread-local fp32 scratch of ~256 KB and multiplied with x by Eigen's GEMM (single-threaded
//    inside the parallel region).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace spear {

struct PackedQuantWeights {  // canonical, as stored in packages
  int out = 0, in = 0, bits = 4, group_size = -1, container_bits = 4;
  std::vector<uint8_t> qweight;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;

  int groups() const { return group_size <= 0 ? 1 : (in + group_size - 1) / group_size; }
  int group_len() const { return group_size <= 0 ? in : group_size; }
  size_t row_bytes() const { return container_bits == 4 ? size_t(in + 1) / 2 : size_t(in); }
};

PackedQuantWeights pack_quantized(const QuantizedMatrix& m);   // container 4 for bits <= 4, else 8
QuantizedMatrix unpack_quantized(const PackedQuantWeights& p);  // the exact inverse

struct CpuQuantWeights {
  int out = 0, in = 0, bits = 4, group_size = -1, container_bits = 4;
  int groups = 1, group_len = 0;
  int in_pad = 0;     // in rounded up to a multiple of 32
  int row_bytes = 0;  // in_pad / 2 (4-bit container) or in_pad (8-bit)
  std::vector<uint8_t> q;        // [out, row_bytes], nibbles reordered per 32-column block (see above)
  std::vector<float> scales;     // [out, groups]
  std::vector<float> zs;         // [out, groups]: zero * scale
  std::vector<int32_t> zeros;    // [out, groups]
};

CpuQuantWeights prepare_cpu_quant(const PackedQuantWeights& p);

// y[T, out] = x[T, in] · dequant(W)ᵀ + bias (bias may be null).
void quant_linear_f32(const float* x, int T, const CpuQuantWeights& w, const float* bias, float* y);

// The dequantizing reference: dequantize W fully (scalar), then a plain loop (double accumulation).
// Used only by tests.
void quant_linear_reference(const float* x, int T, const PackedQuantWeights& w, const float* bias, float* y);

// The kernel the dispatcher uses now ("avx512", "avx2", "scalar"); force one by name (nullptr = auto).
// Forcing a kernel the CPU lacks throws spear::Error.
const char* quant_kernel_name();
void force_quant_kernel(const char* name);
// Kernels this CPU can run, best first.
std::vector<std::string> quant_kernels_available();

// Bytes of the prepared weights (codes + scales + zero terms).
size_t quant_weight_bytes(const CpuQuantWeights& w);

// Largest T served by one pass of the decode (GEMV) kernel; up to kQuantGemvMaxT two passes; larger T uses
// the tiled GEMM path.
inline constexpr int kQuantDecodeMaxT = 8;
inline constexpr int kQuantGemvMaxT = 16;

}  // namespace spear
