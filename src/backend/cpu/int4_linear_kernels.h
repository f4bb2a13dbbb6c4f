#pragma once
// Internal: the per-ISA kernels behind quant_linear_f32 (int4_linear.cpp dispatches). Each ISA file defines
// its functions under `#pragma GCC target`, after all includes, so nothing shared with the portable code is
// compiled for a wider ISA than the CPU may have.
#include "backend/cpu/int4_linear.h"

namespace spear::int4_detail {

// Decode rows [r0, r1) over the column block [cb0, cb1) (multiples of 32; cb1 may pass `in`):
// xp = x padded [T, in_pad] (zeros past `in`), sx = Σx per group [T, groups]. The first block (cb0 == 0) writes
// y[t, r] = Σ_g s_g·(Σ_{c∈g, c<cb1} q·x) - Σ_g zs_g·sx[t, g] + bias[r]; later blocks add their Σ s_g·(Σ q·x).
// Column blocks keep the T rows of x that the inner loop reads within L1.
using DecodeFn = void (*)(const CpuQuantWeights& w, const float* xp, const float* sx, int T, const float* bias,
                          float* y, int r0, int r1, int cb0, int cb1);
// Dequantize rows [r0, r0 + nr), columns [k0, k0 + kw) (k0 a multiple of 32) into dst [nr, ld];
// columns up to round_up(kw, 16) may be written (ld must allow it).
using DequantFn = void (*)(const CpuQuantWeights& w, int r0, int nr, int k0, int kw, float* dst, int ld);

void decode_scalar(const CpuQuantWeights&, const float*, const float*, int, const float*, float*, int, int, int, int);
void dequant_scalar(const CpuQuantWeights&, int, int, int, int, float*, int);
void decode_avx2(const CpuQuantWeights&, const float*, const float*, int, const float*, float*, int, int, int, int);
void dequant_avx2(const CpuQuantWeights&, int, int, int, int, float*, int);
void decode_avx512(const CpuQuantWeights&, const float*, const float*, int, const float*, float*, int, int, int, int);
void dequant_avx512(const CpuQuantWeights&, int, int, int, int, float*, int);

// Code of column c of row `row` in the CPU layout.
inline int cpu_code(const CpuQuantWeights& w, const uint8_t* row, int c) {
  if (w.container_bits == 8) return row[c];
  const int b = c >> 5, j = c & 31;
  const uint8_t byte = row[b * 16 + (j & 15)];
  return j < 16 ? (byte & 15) : (byte >> 4);
}

}  // namespace spear::int4_detail
