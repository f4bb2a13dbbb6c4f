// AVX2 + FMA kernels for quantized linear layers (8-wide). Includes come before the target pragma (see
// int4_linear_avx512.cpp). 16 ymm registers: tokens are processed in batches of up to 4 per weight row (the
// row is re-read from L1 for the next batch).
#include <algorithm>

#include <immintrin.h>

#include "backend/cpu/int4_linear_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace spear::int4_detail {
namespace {

// 8 codes of chunk k (columns 8k .. 8k+7) as int32 lanes. 4-bit layout: 32-column block b = k / 4 is 16 bytes;
// chunk k % 4 = 0: low nibbles of bytes 0..7, 1: low of 8..15, 2: high of 0..7, 3: high of 8..15.
template <int CB>
inline __m256i codes8(const uint8_t* row, int k) {
  if constexpr (CB == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * k)));
  } else {
    const __m256i v =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 * (k >> 2) + 8 * (k & 1))));
    return (k & 2) ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row, tokens [0, TB) of the batch starting at xp (row stride ldx), sx (stride G).
template <int TB, int CB, bool MASKED>
inline void row_batch(const CpuQuantWeights& w, const uint8_t* row, const float* s, const float* xp, size_t ldx,
                      int cb0, int cend, float* res) {
  const int glen = w.group_len;
  __m256 tot[TB];
  for (int t = 0; t < TB; ++t) tot[t] = _mm256_setzero_ps();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = cb0 / glen; g <= (cend - 1) / glen; ++g) {
    const int c0 = std::max(g * glen, cb0), c1 = std::min(g * glen + glen, cend);
    __m256 acc0[TB], acc1[TB];
    for (int t = 0; t < TB; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    int k = c0 >> 3;
    const int ke = (c1 + 7) >> 3;
    if constexpr (MASKED) {
      const __m256i lo = _mm256_set1_epi32(c0 - 1), hi = _mm256_set1_epi32(c1);
      for (; k < ke; ++k) {
        const __m256i idx = _mm256_add_epi32(iota, _mm256_set1_epi32(8 * k));
        const __m256 m = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(idx, lo), _mm256_cmpgt_epi32(hi, idx)));
        const __m256 q = _mm256_and_ps(_mm256_cvtepi32_ps(codes8<CB>(row, k)), m);
        for (int t = 0; t < TB; ++t) acc0[t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xp + t * ldx + 8 * k), acc0[t]);
      }
    } else {
      for (; k + 1 < ke; k += 2) {
        const __m256 qa = _mm256_cvtepi32_ps(codes8<CB>(row, k));
        const __m256 qb = _mm256_cvtepi32_ps(codes8<CB>(row, k + 1));
        for (int t = 0; t < TB; ++t) {
          acc0[t] = _mm256_fmadd_ps(qa, _mm256_loadu_ps(xp + t * ldx + 8 * k), acc0[t]);
          acc1[t] = _mm256_fmadd_ps(qb, _mm256_loadu_ps(xp + t * ldx + 8 * k + 8), acc1[t]);
        }
      }
      if (k < ke) {
        const __m256 q = _mm256_cvtepi32_ps(codes8<CB>(row, k));
        for (int t = 0; t < TB; ++t) acc0[t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xp + t * ldx + 8 * k), acc0[t]);
      }
    }
    const __m256 sv = _mm256_set1_ps(s[g]);
    for (int t = 0; t < TB; ++t) tot[t] = _mm256_fmadd_ps(_mm256_add_ps(acc0[t], acc1[t]), sv, tot[t]);
  }
  for (int t = 0; t < TB; ++t) res[t] = hsum(tot[t]);
}

template <int CB, bool MASKED>
void decode_rows(const CpuQuantWeights& w, const float* xp, const float* sx, int T, const float* bias, float* y, int r0,
                 int r1, int cb0, int cb1) {
  const int G = w.groups;
  const int cend = std::min(cb1, w.in);
  if (cb0 >= cend) return;
  const size_t ldx = size_t(w.in_pad);
  float res[4];
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    const float* zs = w.zs.data() + size_t(r) * G;
    const float b = bias ? bias[r] : 0.f;
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int tb = std::min(4, T - t0);
      const float* xb = xp + t0 * ldx;
      switch (tb) {
        case 1: row_batch<1, CB, MASKED>(w, row, s, xb, ldx, cb0, cend, res); break;
        case 2: row_batch<2, CB, MASKED>(w, row, s, xb, ldx, cb0, cend, res); break;
        case 3: row_batch<3, CB, MASKED>(w, row, s, xb, ldx, cb0, cend, res); break;
        default: row_batch<4, CB, MASKED>(w, row, s, xb, ldx, cb0, cend, res); break;
      }
      for (int t = 0; t < tb; ++t) {
        float& out = y[size_t(t0 + t) * w.out + r];
        if (cb0 == 0) {
          float corr = 0.f;
          for (int g = 0; g < G; ++g) corr += zs[g] * sx[size_t(t0 + t) * G + g];
          out = res[t] - corr + b;
        } else {
          out += res[t];
        }
      }
    }
  }
}

}  // namespace

void decode_avx2(const CpuQuantWeights& w, const float* xp, const float* sx, int T, const float* bias, float* y,
                 int r0, int r1, int cb0, int cb1) {
  const bool masked = w.groups > 1 && (w.group_len % 8) != 0;
  if (w.container_bits == 4) {
    if (masked) decode_rows<4, true>(w, xp, sx, T, bias, y, r0, r1, cb0, cb1);
    else decode_rows<4, false>(w, xp, sx, T, bias, y, r0, r1, cb0, cb1);
  } else {
    if (masked) decode_rows<8, true>(w, xp, sx, T, bias, y, r0, r1, cb0, cb1);
    else decode_rows<8, false>(w, xp, sx, T, bias, y, r0, r1, cb0, cb1);
  }
}

void dequant_avx2(const CpuQuantWeights& w, int r0, int nr, int k0, int kw, float* dst, int ld) {
  const int G = w.groups, glen = w.group_len, in = w.in;
  const int kb = k0 >> 3, ke = (k0 + kw + 7) >> 3;
  for (int i = 0; i < nr; ++i) {
    const int r = r0 + i;
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    const int32_t* z = w.zeros.data() + size_t(r) * G;
    float* d = dst + size_t(i) * ld;
    for (int k = kb; k < ke; ++k) {
      const int c = 8 * k;
      const int ga = c / glen, gb = std::min(c + 7, in - 1) / glen;
      __m256i zv;
      __m256 sv;
      if (ga == gb) {
        zv = _mm256_set1_epi32(z[ga]);
        sv = _mm256_set1_ps(s[ga]);
      } else {
        alignas(32) int32_t zl[8];
        alignas(32) float sl[8];
        for (int l = 0; l < 8; ++l) {
          const int gl = std::min(c + l, in - 1) / glen;
          zl[l] = z[gl];
          sl[l] = s[gl];
        }
        zv = _mm256_load_si256(reinterpret_cast<const __m256i*>(zl));
        sv = _mm256_load_ps(sl);
      }
      const __m256i q = w.container_bits == 4 ? codes8<4>(row, k) : codes8<8>(row, k);
      _mm256_storeu_ps(d + (c - 8 * kb), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, zv)), sv));
    }
  }
}

}  // namespace spear::int4_detail

#pragma GCC pop_options
