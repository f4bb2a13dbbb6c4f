// AVX-512 (F) kernels for quantized linear layers. Everything is included before the target pragma so that
// no inline function shared with the portable code is compiled for AVX-512 here.
#include <algorithm>

#include <immintrin.h>

#include "backend/cpu/int4_linear_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

namespace spear::int4_detail {
namespace {

// 16 codes of chunk k (columns 16k .. 16k+15) as int32 lanes.
template <int CB>
inline __m512i codes16(const uint8_t* row, int k) {
  if constexpr (CB == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * k)));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * (k >> 1))));
    return (k & 1) ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15));
  }
}

// Codes of chunks k (even) and k+1: one 16-byte load for the 4-bit container.
template <int CB>
inline void codes32(const uint8_t* row, int k, __m512& lo, __m512& hi) {
  if constexpr (CB == 8) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * k))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * k + 16))));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * k)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
}

// Rows [r0, r1) for T tokens over the column block [cb0, cb1). MASKED: groups that do not start/end on 16-column
// boundaries (x is masked to the group's columns per chunk). Otherwise every group piece starts on a chunk
// boundary and the last chunk of the row reads zero-padded x, so no masks are needed.
// For T <= 4 two accumulator sets (even / odd chunks) give enough independent FMA chains; for larger T the
// tokens themselves do, and a second set would not fit in 32 registers.
template <int T, int CB, bool MASKED>
void decode_rows(const CpuQuantWeights& w, const float* xp, const float* sx, const float* bias, float* y, int r0,
                 int r1, int cb0, int cb1) {
  constexpr bool kTwo = T <= 4;
  const int G = w.groups, glen = w.group_len, in = w.in;
  const int cend = std::min(cb1, in);
  if (cb0 >= cend) return;
  const int g0 = cb0 / glen, g1 = (cend - 1) / glen;
  const size_t ldx = size_t(w.in_pad);
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    __m512 tot[T];
    for (int t = 0; t < T; ++t) tot[t] = _mm512_setzero_ps();
    for (int g = g0; g <= g1; ++g) {
      const int c0 = std::max(g * glen, cb0), c1 = std::min(g * glen + glen, cend);
      __m512 acc0[T], acc1[T];
      for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
      int k = c0 >> 4;
      const int ke = (c1 + 15) >> 4;
      if constexpr (MASKED) {
        for (; k < ke; ++k) {
          const int lo = std::max(c0 - 16 * k, 0), hi = std::min(c1 - 16 * k, 16);
          const __mmask16 m = __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
          const __m512 q = _mm512_cvtepi32_ps(codes16<CB>(row, k));
          for (int t = 0; t < T; ++t)
            acc0[t] = _mm512_fmadd_ps(q, _mm512_maskz_loadu_ps(m, xp + t * ldx + 16 * k), acc0[t]);
        }
      } else {
        if ((k & 1) && k < ke) {
          const __m512 q = _mm512_cvtepi32_ps(codes16<CB>(row, k));
          for (int t = 0; t < T; ++t) acc0[t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xp + t * ldx + 16 * k), acc0[t]);
          ++k;
        }
        for (; k + 1 < ke; k += 2) {
          __m512 qlo, qhi;
          codes32<CB>(row, k, qlo, qhi);
          const float* xk = xp + 16 * k;
          for (int t = 0; t < T; ++t) {
            acc0[t] = _mm512_fmadd_ps(qlo, _mm512_loadu_ps(xk + t * ldx), acc0[t]);
            if constexpr (kTwo) acc1[t] = _mm512_fmadd_ps(qhi, _mm512_loadu_ps(xk + t * ldx + 16), acc1[t]);
            else acc0[t] = _mm512_fmadd_ps(qhi, _mm512_loadu_ps(xk + t * ldx + 16), acc0[t]);
          }
        }
        if (k < ke) {
          const __m512 q = _mm512_cvtepi32_ps(codes16<CB>(row, k));
          for (int t = 0; t < T; ++t) acc0[t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xp + t * ldx + 16 * k), acc0[t]);
        }
      }
      const __m512 sv = _mm512_set1_ps(s[g]);
      for (int t = 0; t < T; ++t) tot[t] = _mm512_fmadd_ps(kTwo ? _mm512_add_ps(acc0[t], acc1[t]) : acc0[t], sv, tot[t]);
    }
    if (cb0 == 0) {
      const float* zs = w.zs.data() + size_t(r) * G;
      const float b = bias ? bias[r] : 0.f;
      for (int t = 0; t < T; ++t) {
        float corr = 0.f;
        for (int g = 0; g < G; ++g) corr += zs[g] * sx[size_t(t) * G + g];
        y[size_t(t) * w.out + r] = _mm512_reduce_add_ps(tot[t]) - corr + b;
      }
    } else {
      for (int t = 0; t < T; ++t) y[size_t(t) * w.out + r] += _mm512_reduce_add_ps(tot[t]);
    }
  }
}

template <int T>
void decode_t(const CpuQuantWeights& w, const float* xp, const float* sx, const float* bias, float* y, int r0, int r1,
              int cb0, int cb1) {
  const bool masked = w.groups > 1 && (w.group_len % 16) != 0;
  if (w.container_bits == 4) {
    if (masked) decode_rows<T, 4, true>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    else decode_rows<T, 4, false>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
  } else {
    if (masked) decode_rows<T, 8, true>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    else decode_rows<T, 8, false>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
  }
}

}  // namespace

void decode_avx512(const CpuQuantWeights& w, const float* xp, const float* sx, int T, const float* bias, float* y,
                   int r0, int r1, int cb0, int cb1) {
  switch (T) {
    case 1: return decode_t<1>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 2: return decode_t<2>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 3: return decode_t<3>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 4: return decode_t<4>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 5: return decode_t<5>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 6: return decode_t<6>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 7: return decode_t<7>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    case 8: return decode_t<8>(w, xp, sx, bias, y, r0, r1, cb0, cb1);
    default:  // not reached through quant_linear_f32 (T <= kQuantDecodeMaxT)
      return decode_scalar(w, xp, sx, T, bias, y, r0, r1, cb0, cb1);
  }
}

void dequant_avx512(const CpuQuantWeights& w, int r0, int nr, int k0, int kw, float* dst, int ld) {
  const int G = w.groups, glen = w.group_len, in = w.in;
  const int kb = k0 >> 4, ke = (k0 + kw + 15) >> 4;
  for (int i = 0; i < nr; ++i) {
    const int r = r0 + i;
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    const int32_t* z = w.zeros.data() + size_t(r) * G;
    float* d = dst + size_t(i) * ld;
    for (int k = kb; k < ke; ++k) {
      const int c = 16 * k;
      const int ga = c / glen, gb = std::min(c + 15, in - 1) / glen;
      __m512i zv;
      __m512 sv;
      if (ga == gb) {
        zv = _mm512_set1_epi32(z[ga]);
        sv = _mm512_set1_ps(s[ga]);
      } else {
        alignas(64) int32_t zl[16];
        alignas(64) float sl[16];
        for (int l = 0; l < 16; ++l) {
          const int g = std::min(c + l, in - 1) / glen;
          zl[l] = z[g];
          sl[l] = s[g];
        }
        zv = _mm512_load_si512(zl);
        sv = _mm512_load_ps(sl);
      }
      const __m512i q = w.container_bits == 4 ? codes16<4>(row, k) : codes16<8>(row, k);
      _mm512_storeu_ps(d + (c - 16 * kb), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, zv)), sv));
    }
  }
}

}  // namespace spear::int4_detail

#pragma GCC pop_options
