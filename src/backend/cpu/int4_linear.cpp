// Quantized linear layers on the CPU: packing, the CPU layout, dispatch, the decode / GEMM drivers, and the
// portable C++ kernels. The AVX2 / AVX-512 kernels are in int4_linear_avx2.cpp / int4_linear_avx512.cpp.
#include <algorithm>
#include <atomic>
#include <cstring>

#include <Eigen/Core>
#include <omp.h>

#include "backend/cpu/int4_linear.h"
#include "backend/cpu/int4_linear_kernels.h"
#include "core/error.h"

namespace spear {

using namespace int4_detail;

// ---------------------------------------------------------------- packing

PackedQuantWeights pack_quantized(const QuantizedMatrix& m) {
  const QuantParams& qp = m.params;
  if (qp.bits < 2 || qp.bits > 8) fail("pack_quantized: bits must be in 2..8, got {}", qp.bits);
  const int G = qp.groups(m.in);
  if (m.q.size() != size_t(m.out) * m.in || m.scales.size() != size_t(m.out) * G || m.zeros.size() != m.scales.size())
    fail("pack_quantized: inconsistent sizes (out {}, in {}, groups {})", m.out, m.in, G);
  PackedQuantWeights p;
  p.out = m.out;
  p.in = m.in;
  p.bits = qp.bits;
  p.group_size = qp.group_size <= 0 ? -1 : qp.group_size;
  p.container_bits = qp.bits <= 4 ? 4 : 8;
  p.scales = m.scales;
  p.zeros = m.zeros;
  const size_t rb = p.row_bytes();
  p.qweight.assign(size_t(m.out) * rb, 0);
  const int max_q = qp.max_q();
  for (int r = 0; r < m.out; ++r) {
    const uint8_t* src = m.q.data() + size_t(r) * m.in;
    uint8_t* dst = p.qweight.data() + size_t(r) * rb;
    for (int c = 0; c < m.in; ++c) {
      if (src[c] > max_q) fail("pack_quantized: code {} at ({}, {}) exceeds {} bits", src[c], r, c, qp.bits);
      if (p.container_bits == 8) dst[c] = src[c];
      else dst[c >> 1] |= uint8_t(src[c] << ((c & 1) * 4));
    }
  }
  return p;
}

QuantizedMatrix unpack_quantized(const PackedQuantWeights& p) {
  QuantizedMatrix m;
  m.out = p.out;
  m.in = p.in;
  m.params.bits = p.bits;
  m.params.group_size = p.group_size;
  m.scales = p.scales;
  m.zeros = p.zeros;
  const size_t rb = p.row_bytes();
  if (p.qweight.size() != size_t(p.out) * rb)
    fail("unpack_quantized: qweight has {} bytes, expected {}", p.qweight.size(), size_t(p.out) * rb);
  m.q.resize(size_t(p.out) * p.in);
  for (int r = 0; r < p.out; ++r) {
    const uint8_t* src = p.qweight.data() + size_t(r) * rb;
    uint8_t* dst = m.q.data() + size_t(r) * p.in;
    for (int c = 0; c < p.in; ++c)
      dst[c] = p.container_bits == 8 ? src[c] : uint8_t((src[c >> 1] >> ((c & 1) * 4)) & 15);
  }
  return m;
}

CpuQuantWeights prepare_cpu_quant(const PackedQuantWeights& p) {
  if (p.container_bits != 4 && p.container_bits != 8) fail("prepare_cpu_quant: container of {} bits", p.container_bits);
  if (p.container_bits == 4 && p.bits > 4) fail("prepare_cpu_quant: {} bits do not fit a 4-bit container", p.bits);
  if (p.out <= 0 || p.in <= 0) fail("prepare_cpu_quant: empty matrix {}x{}", p.out, p.in);
  const int G = p.groups();
  if (p.scales.size() != size_t(p.out) * G || p.zeros.size() != p.scales.size() ||
      p.qweight.size() != size_t(p.out) * p.row_bytes())
    fail("prepare_cpu_quant: inconsistent sizes (out {}, in {}, groups {})", p.out, p.in, G);
  CpuQuantWeights w;
  w.out = p.out;
  w.in = p.in;
  w.bits = p.bits;
  w.group_size = p.group_size;
  w.container_bits = p.container_bits;
  w.groups = G;
  w.group_len = p.group_len();
  w.in_pad = (p.in + 31) / 32 * 32;
  w.row_bytes = p.container_bits == 4 ? w.in_pad / 2 : w.in_pad;
  w.q.assign(size_t(p.out) * w.row_bytes, 0);
  const size_t rb = p.row_bytes();
  for (int r = 0; r < p.out; ++r) {
    const uint8_t* src = p.qweight.data() + size_t(r) * rb;
    uint8_t* dst = w.q.data() + size_t(r) * w.row_bytes;
    for (int c = 0; c < p.in; ++c) {
      if (p.container_bits == 8) {
        dst[c] = src[c];
      } else {
        const int code = (src[c >> 1] >> ((c & 1) * 4)) & 15;
        const int b = c >> 5, j = c & 31;
        dst[b * 16 + (j & 15)] |= uint8_t(code << (j < 16 ? 0 : 4));
      }
    }
  }
  w.scales = p.scales;
  w.zs.resize(p.scales.size());
  w.zeros.resize(p.zeros.size());
  for (size_t i = 0; i < p.scales.size(); ++i) {
    w.zeros[i] = p.zeros[i];
    w.zs[i] = float(p.zeros[i]) * p.scales[i];
  }
  return w;
}

size_t quant_weight_bytes(const CpuQuantWeights& w) {
  return w.q.size() + w.scales.size() * sizeof(float) + w.zs.size() * sizeof(float) + w.zeros.size() * sizeof(int32_t);
}

// ---------------------------------------------------------------- reference

void quant_linear_reference(const float* x, int T, const PackedQuantWeights& w, const float* bias, float* y) {
  const std::vector<float> W = unpack_quantized(w).dequantize();
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < w.out; ++r) {
      double acc = bias ? bias[r] : 0.0;
      const float* wr = W.data() + size_t(r) * w.in;
      const float* xt = x + size_t(t) * w.in;
      for (int c = 0; c < w.in; ++c) acc += double(wr[c]) * double(xt[c]);
      y[size_t(t) * w.out + r] = float(acc);
    }
}

// ---------------------------------------------------------------- portable kernels

namespace int4_detail {

void decode_scalar(const CpuQuantWeights& w, const float* xp, const float* sx, int T, const float* bias, float* y,
                   int r0, int r1, int cb0, int cb1) {
  const int G = w.groups, glen = w.group_len, in = w.in, ldx = w.in_pad;
  const int cend = std::min(cb1, in);
  if (cb0 >= cend) return;
  float acc[kQuantDecodeMaxT], tot[kQuantDecodeMaxT];
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    const float* zs = w.zs.data() + size_t(r) * G;
    for (int t = 0; t < T; ++t) tot[t] = 0.f;
    for (int g = cb0 / glen; g <= (cend - 1) / glen; ++g) {
      const int c0 = std::max(g * glen, cb0), c1 = std::min(g * glen + glen, cend);
      for (int t = 0; t < T; ++t) acc[t] = 0.f;
      for (int c = c0; c < c1; ++c) {
        const float q = float(cpu_code(w, row, c));
        for (int t = 0; t < T; ++t) acc[t] += q * xp[size_t(t) * ldx + c];
      }
      for (int t = 0; t < T; ++t) tot[t] += s[g] * acc[t];
    }
    for (int t = 0; t < T; ++t) {
      float& out = y[size_t(t) * w.out + r];
      if (cb0 == 0) {
        float corr = 0.f;
        for (int g = 0; g < G; ++g) corr += zs[g] * sx[size_t(t) * G + g];
        out = tot[t] - corr + (bias ? bias[r] : 0.f);
      } else {
        out += tot[t];
      }
    }
  }
}

void dequant_scalar(const CpuQuantWeights& w, int r0, int nr, int k0, int kw, float* dst, int ld) {
  const int G = w.groups, glen = w.group_len;
  for (int i = 0; i < nr; ++i) {
    const int r = r0 + i;
    const uint8_t* row = w.q.data() + size_t(r) * w.row_bytes;
    const float* s = w.scales.data() + size_t(r) * G;
    const int32_t* z = w.zeros.data() + size_t(r) * G;
    float* d = dst + size_t(i) * ld;
    for (int c = k0; c < k0 + kw; ++c) {
      const int g = c / glen;
      d[c - k0] = float(cpu_code(w, row, c) - z[g]) * s[g];
    }
  }
}

}  // namespace int4_detail

// ---------------------------------------------------------------- dispatch

namespace {

enum class Kernel { Scalar = 0, Avx2 = 1, Avx512 = 2 };

bool cpu_has(Kernel k) {
  switch (k) {
    case Kernel::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    case Kernel::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
}

Kernel best_kernel() {
  if (cpu_has(Kernel::Avx512)) return Kernel::Avx512;
  if (cpu_has(Kernel::Avx2)) return Kernel::Avx2;
  return Kernel::Scalar;
}

const char* kernel_str(Kernel k) {
  return k == Kernel::Avx512 ? "avx512" : (k == Kernel::Avx2 ? "avx2" : "scalar");
}

std::atomic<int> g_forced{-1};

Kernel current_kernel() {
  const int f = g_forced.load(std::memory_order_relaxed);
  return f >= 0 ? Kernel(f) : best_kernel();
}

struct KernelFns {
  DecodeFn decode;
  DequantFn dequant;
};

KernelFns fns(Kernel k) {
  switch (k) {
    case Kernel::Avx512:
      return {decode_avx512, dequant_avx512};
    case Kernel::Avx2:
      return {decode_avx2, dequant_avx2};
    default:
      return {decode_scalar, dequant_scalar};
  }
}

// Reused across calls (per calling thread): padded x and per-group sums for decode.
thread_local std::vector<float> tl_xp, tl_sx;

void decode_path(const float* x, int T, const CpuQuantWeights& w, const float* bias, float* y, DecodeFn decode) {
  const int in = w.in, ldx = w.in_pad, G = w.groups, glen = w.group_len;
  tl_xp.assign(size_t(T) * ldx, 0.f);
  tl_sx.resize(size_t(T) * G);
  for (int t = 0; t < T; ++t) {
    std::memcpy(tl_xp.data() + size_t(t) * ldx, x + size_t(t) * in, sizeof(float) * size_t(in));
    for (int g = 0; g < G; ++g) {
      const int c0 = g * glen, c1 = std::min(c0 + glen, in);
      double s = 0;
      for (int c = c0; c < c1; ++c) s += x[size_t(t) * in + c];
      tl_sx[size_t(t) * G + g] = float(s);
    }
  }
  const float* xp = tl_xp.data();
  const float* sx = tl_sx.data();
  // Column blocks: the T rows of x read by the inner loop stay within ~32 KB (L1).
  const int bk = std::max(256, (8192 / T) / 32 * 32);
  // Threads only when the layer is big enough to amortize the fork.
  const double work = double(w.out) * w.in_pad * (T + 2);
  const int nthreads = work < 2e5 ? 1 : std::min(omp_get_max_threads(), (w.out + 15) / 16);
#pragma omp parallel num_threads(nthreads)
  {
    // Contiguous rows per thread (multiples of 16), column blocks outer so x stays in L1 across rows.
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int per = (w.out + nt - 1) / nt;
    const int rows = (per + 15) / 16 * 16;
    const int r0 = std::min(w.out, tid * rows), r1 = std::min(w.out, r0 + rows);
    if (r0 < r1)
      for (int cb0 = 0; cb0 < w.in; cb0 += bk) decode(w, xp, sx, T, bias, y, r0, r1, cb0, cb0 + bk);
  }
}

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Strided = Eigen::OuterStride<>;

void gemm_path(const float* x, int T, const CpuQuantWeights& w, const float* bias, float* y, DequantFn dequant) {
  const int out = w.out, in = w.in;
  const int nthreads = omp_get_max_threads();
  // Rows per block: 256 (Eigen re-packs x once per block, 1 float per 2·rows flops), fewer when the layer is
  // small so that every thread gets blocks. Measured on the 2-core Xeon (4096x4096, T = 512): R = 32 / 64 /
  // 128 / 256 reach 0.7 / 0.85 / 1.0 / 1.1x of the fp32 Eigen GEMM.
  int R = 256;
  while (R > 16 && (out + R - 1) / R < 2 * nthreads) R /= 2;
  // K-chunk: keep the fp32 tile within ~256 KB (L2).
  int kc = std::max(32, (256 * 1024 / int(sizeof(float)) / R) / 32 * 32);
  if (kc >= in) kc = (in + 31) / 32 * 32;
  const int ld = kc;
  const int nblocks = (out + R - 1) / R;
#pragma omp parallel num_threads(std::min(nthreads, nblocks))
  {
    std::vector<float> tile(size_t(R) * ld);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < nblocks; ++b) {
      const int r0 = b * R, nr = std::min(R, out - r0);
      Eigen::Map<RowMajor, Eigen::Unaligned, Strided> Y(y + r0, T, nr, Strided(out));
      for (int k0 = 0; k0 < in; k0 += kc) {
        const int kw = std::min(kc, in - k0);
        dequant(w, r0, nr, k0, kw, tile.data(), ld);
        Eigen::Map<const RowMajor, Eigen::Unaligned, Strided> X(x + k0, T, kw, Strided(in));
        Eigen::Map<const RowMajor, Eigen::Unaligned, Strided> Wt(tile.data(), nr, kw, Strided(ld));
        if (k0 == 0) Y.noalias() = X * Wt.transpose();
        else Y.noalias() += X * Wt.transpose();
      }
      if (bias) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias + r0, nr);
    }
  }
}

}  // namespace

const char* quant_kernel_name() { return kernel_str(current_kernel()); }

void force_quant_kernel(const char* name) {
  if (!name) {
    g_forced = -1;
    return;
  }
  for (Kernel k : {Kernel::Scalar, Kernel::Avx2, Kernel::Avx512}) {
    if (std::strcmp(name, kernel_str(k)) == 0) {
      if (!cpu_has(k)) fail("quant kernel '{}' is not supported by this CPU", name);
      g_forced = int(k);
      return;
    }
  }
  fail("unknown quant kernel '{}' (avx512, avx2, scalar)", name);
}

std::vector<std::string> quant_kernels_available() {
  std::vector<std::string> v;
  for (Kernel k : {Kernel::Avx512, Kernel::Avx2, Kernel::Scalar})
    if (cpu_has(k)) v.push_back(kernel_str(k));
  return v;
}

void quant_linear_f32(const float* x, int T, const CpuQuantWeights& w, const float* bias, float* y) {
  if (T <= 0) return;
  const KernelFns f = fns(current_kernel());
  if (T <= kQuantDecodeMaxT) {
    decode_path(x, T, w, bias, y, f.decode);
  } else if (T <= kQuantGemvMaxT) {
    // Two balanced decode passes beat the GEMM path up to ~16 tokens (its per-block overheads dominate there).
    const int t1 = (T + 1) / 2;
    decode_path(x, t1, w, bias, y, f.decode);
    decode_path(x + size_t(t1) * w.in, T - t1, w, bias, y + size_t(t1) * w.out, f.decode);
  } else {
    gemm_path(x, T, w, bias, y, f.dequant);
  }
}

}  // namespace spear
