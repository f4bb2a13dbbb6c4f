// Helpers of the W4A16 GEMM tests (test_cuda_w4a16*.cpp): random RTN matrices
// and bf16 inputs, device buffers, NaN-poisoned outputs with a canary tail, the
// fast and reference kernels run into host vectors, and scoped W4GemmOptions.
// Header-only (inline), one copy per test file.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/dtype.h"
#include "quant/quantizer.h"
#include "spear/compensator.h"

namespace spear::w4test {

inline constexpr uint16_t kPoisonBf16 = 0xffff;  // a NaN
inline constexpr size_t kCanary = 64;            // poisoned elements after y that must stay untouched

// RTN codes of a random normal [out, in] matrix.
inline PackedQuantWeights random_quantized(int out, int in, int bits, int group, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::vector<float> w(size_t(out) * in);
  for (float& v : w) v = nd(rng);
  QuantParams qp;
  qp.bits = bits;
  qp.group_size = group;
  return pack_quantized(rtn_quantize(w.data(), out, in, qp));
}

// A random compensator whose term is about a third of a W4 output of N(0, 0.02²) weights on unit inputs, so that a
// wrong split or a dropped term cannot pass (the EC and tensor-parallel tests); gated when gate > 0.
inline Compensator random_compensator(int in, int out, int rank, int gate, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Compensator c;
  c.module = "test";
  c.resize(in, out, rank, 0);
  const float sa = 1.f / std::sqrt(float(in)), sb = 0.3f * 0.02f * std::sqrt(float(in) / float(rank));
  for (float& v : c.A) v = sa * nd(rng);
  for (float& v : c.B) v = sb * nd(rng);
  if (gate > 0) {
    c.init_gate(gate, 1.f / std::sqrt(float(rank)), seed + 1);
    for (float& v : c.b1) v = 0.1f * nd(rng);
    for (float& v : c.W2) v = 0.5f * nd(rng) / std::sqrt(float(gate));
    for (float& v : c.b2) v = 0.1f * nd(rng);
  }
  c.round_to_bf16();
  return c;
}

inline std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float sd = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = f32_to_bf16(nd(rng));
  return v;
}

inline std::vector<float> to_f32(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = bf16_to_f32(v[i]);
  return f;
}

inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline std::string shape_name(int n, int k, int group, int bits) {
  std::ostringstream s;
  s << "n=" << n << " k=" << k << " group=" << group << " bits=" << bits;
  return s.str();
}

// ---------------------------------------------------------------- device
// helpers

// A device array that frees itself.
template <typename T>
class W4DevBuf {
 public:
  explicit W4DevBuf(size_t n) : n_(n) { SPEAR_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit W4DevBuf(const std::vector<T>& h) : W4DevBuf(h.size()) {
    SPEAR_CUDA_CHECK(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~W4DevBuf() { cudaFree(p_); }
  W4DevBuf(const W4DevBuf&) = delete;
  W4DevBuf& operator=(const W4DevBuf&) = delete;
  T* get() const { return p_; }
  size_t size() const { return n_; }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    SPEAR_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// A W4Layout uploaded as is.
struct UploadedW4 {
  explicit UploadedW4(const cuda::W4Layout& l) : q(l.q), scales(l.scales), zeros(l.zeros) {
    dev = cuda::W4Device{l.n, l.k, l.n_pad, l.k_pad, l.group_size, l.groups, q.get(), scales.get(), zeros.get()};
  }
  W4DevBuf<uint32_t> q;
  W4DevBuf<float> scales;
  W4DevBuf<uint16_t> zeros;
  cuda::W4Device dev;
};

inline const __nv_bfloat16* bf(const W4DevBuf<uint16_t>& b) { return reinterpret_cast<const __nv_bfloat16*>(b.get()); }
inline __nv_bfloat16* bf_mut(const W4DevBuf<uint16_t>& b) { return reinterpret_cast<__nv_bfloat16*>(b.get()); }

// A random gated compensator on the device, as the backend uploads one (w4a16_gemm.h: W4EcDevice).
struct DevEc {
  DevEc(int in, int out, int rank, int gate, uint32_t seed) {
    const Compensator c = random_compensator(in, out, rank, gate, seed);
    std::vector<uint16_t> a(c.A.size()), b(c.B.size());
    for (size_t i = 0; i < a.size(); ++i) a[i] = f32_to_bf16(c.A[i]);
    for (size_t i = 0; i < b.size(); ++i) b[i] = f32_to_bf16(c.B[i]);
    A = std::make_unique<W4DevBuf<uint16_t>>(a);
    B = std::make_unique<W4DevBuf<uint16_t>>(b);
    W1 = std::make_unique<W4DevBuf<float>>(c.W1);
    b1 = std::make_unique<W4DevBuf<float>>(c.b1);
    W2 = std::make_unique<W4DevBuf<float>>(c.W2);
    b2 = std::make_unique<W4DevBuf<float>>(c.b2);
    scratch = std::make_unique<W4DevBuf<unsigned char>>(cuda::w4a16_ec_scratch_bytes(rank));
    cuda::w4a16_ec_scratch_init(scratch->get(), rank);
    dev = cuda::W4EcDevice{rank,     gate,     bf_mut(*A), bf_mut(*B), W1->get(),
                           b1->get(), W2->get(), b2->get(), scratch->get()};
  }
  std::unique_ptr<W4DevBuf<uint16_t>> A, B;
  std::unique_ptr<W4DevBuf<float>> W1, b1, W2, b2;
  std::unique_ptr<W4DevBuf<unsigned char>> scratch;
  cuda::W4EcDevice dev;
};


// The fast kernel into a freshly poisoned y (+ canary); returns y as floats,
// fails the test on unwritten elements or on a write past the end.
inline std::vector<float> run_fast(const W4DevBuf<uint16_t>& x, int m, const cuda::W4Device& w,
                                   const __nv_bfloat16* bias, void* ws, size_t ws_bytes, int sm_count,
                                   const std::string& what, std::vector<uint16_t>* raw = nullptr) {
  const size_t ny = size_t(m) * w.n;
  W4DevBuf<uint16_t> y(ny + kCanary);
  SPEAR_CUDA_CHECK(cudaMemset(y.get(), 0xff, (ny + kCanary) * 2));
  cuda::w4a16_gemm(bf(x), m, w, bias, bf_mut(y), ws, ws_bytes, sm_count, nullptr);
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> h = y.download();
  std::vector<float> out(ny);
  size_t unwritten = 0, first = 0;
  for (size_t i = 0; i < ny; ++i) {
    out[i] = bf16_to_f32(h[i]);
    if (!std::isfinite(out[i]) && unwritten++ == 0) first = i;
  }
  EXPECT_EQ(unwritten, 0u) << what << ": " << unwritten << " outputs not written (first: token " << first / w.n
                           << ", feature " << first % w.n << ")";
  for (size_t i = ny; i < ny + kCanary; ++i)
    if (h[i] != kPoisonBf16) {
      ADD_FAILURE() << what << ": write past the end of y at +" << (i - ny);
      break;
    }
  if (raw) raw->assign(h.begin(), h.begin() + ny);
  return out;
}

inline std::vector<float> run_reference(const W4DevBuf<uint16_t>& x, int m, const cuda::W4Device& w,
                                        const __nv_bfloat16* bias) {
  W4DevBuf<float> y(size_t(m) * w.n);
  cuda::w4a16_gemm_reference(bf(x), m, w, bias, y.get(), nullptr);
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  return y.download();
}

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

// Sets W4GemmOptions for one test and restores the previous ones.
class ScopedW4Options {
 public:
  explicit ScopedW4Options(const cuda::W4GemmOptions& o) : saved_(cuda::w4a16_get_options()) {
    cuda::w4a16_set_options(o);
  }
  ~ScopedW4Options() { cuda::w4a16_set_options(saved_); }
  ScopedW4Options(const ScopedW4Options&) = delete;
  ScopedW4Options& operator=(const ScopedW4Options&) = delete;

 private:
  cuda::W4GemmOptions saved_;
};

// Checks a poisoned output (+ canary) after a run: every element written,
// nothing beyond.
inline std::vector<float> check_poisoned(const W4DevBuf<uint16_t>& y, size_t ny, const std::string& what,
                                         std::vector<uint16_t>* raw = nullptr) {
  std::vector<uint16_t> h = y.download();
  std::vector<float> out(ny);
  size_t unwritten = 0;
  for (size_t i = 0; i < ny; ++i) {
    out[i] = bf16_to_f32(h[i]);
    if (!std::isfinite(out[i])) ++unwritten;
  }
  EXPECT_EQ(unwritten, 0u) << what << ": outputs not written";
  for (size_t i = ny; i < h.size(); ++i)
    if (h[i] != kPoisonBf16) {
      ADD_FAILURE() << what << ": write past the end of y at +" << (i - ny);
      break;
    }
  if (raw) raw->assign(h.begin(), h.begin() + ny);
  return out;
}

inline std::unique_ptr<W4DevBuf<uint16_t>> poisoned_y(size_t ny) {
  auto y = std::make_unique<W4DevBuf<uint16_t>>(ny + kCanary);
  SPEAR_CUDA_CHECK(cudaMemset(y->get(), 0xff, (ny + kCanary) * 2));
  return y;
}

}  // namespace spear::w4test
