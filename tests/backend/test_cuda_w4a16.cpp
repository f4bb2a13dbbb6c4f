// W4A16 GEMM (backend/cuda/w4a16_gemm.h): the layout shuffle on the CPU (no GPU needed), then the reference
// kernel against the CPU reference (quant_linear_reference) and the fast kernel against the reference kernel.
//
// Weights: RTN (quant/quantizer.h) of random normal matrices; x: random normal bf16. Error measure:
// ‖out − ref‖ / ‖ref‖ over the whole output.
//  * reference kernel vs CPU: same dequantized fp32 weights, fp32 vs double sums → < 2e-5;
//  * fast kernel vs reference kernel: the fast kernel's sums are exact up to fp32 accumulation order and its
//    output is rounded to bf16 (~1e-3 alone) → < 1e-2.
// Every fast run writes into a NaN-poisoned y with a poisoned canary tail (each element must be written, none
// beyond), runs twice (bit-identical: the split-K reduction is ordered) and, for the split plans, also with a
// forced huge SM count (maximal split-K) and with no workspace (no split-K).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/dtype.h"
#include "core/error.h"
#include "quant/quantizer.h"
#include "w4a16_test_util.h"

namespace spear {

using namespace w4test;

// ================================================================ layout (CPU only)

TEST(W4Layout, UnprepareInvertsPrepare) {
  const std::pair<int, int> shapes[] = {{1, 1}, {1, 16}, {3, 7}, {17, 70}, {33, 129}, {100, 1000}, {513, 64}, {5, 257}};
  uint32_t seed = 1;
  for (auto [n, k] : shapes)
    for (int group : {-1, 16, 32, 64, 128})
      for (int bits : {2, 3, 4}) {
        const PackedQuantWeights p = random_quantized(n, k, bits, group, seed++);
        ASSERT_TRUE(cuda::w4_supported(p)) << shape_name(n, k, group, bits);
        const cuda::W4Layout l = cuda::w4_prepare(p);
        ASSERT_EQ(l.n_pad % 16, 0);
        ASSERT_EQ(l.k_pad % 64, 0);
        ASSERT_EQ(l.q.size(), size_t(l.n_pad) * l.k_pad / 8);
        ASSERT_EQ(l.scales.size(), size_t(l.groups) * l.n_pad);
        const PackedQuantWeights b = cuda::w4_unprepare(l, bits);
        const std::string what = shape_name(n, k, group, bits);
        EXPECT_EQ(b.out, p.out) << what;
        EXPECT_EQ(b.in, p.in) << what;
        EXPECT_EQ(b.bits, p.bits) << what;
        EXPECT_EQ(b.group_size, p.group_size) << what;
        EXPECT_EQ(b.container_bits, p.container_bits) << what;
        EXPECT_TRUE(b.qweight == p.qweight) << what;
        EXPECT_TRUE(b.scales == p.scales) << what;
        EXPECT_TRUE(b.zeros == p.zeros) << what;
      }
}

// The layout against the PTX ISA's m16n8k16 A-fragment table, independently of w4a16_layout.cpp's index code:
// lane (g = lane / 4, t = lane % 4) register R_i holds {A[row][col], A[row][col + 1]} with
//   R0: row g, col 2t;  R1: row g + 8, col 2t;  R2: row g, col 2t + 8;  R3: row g + 8, col 2t + 8,
// and the kernel's lop3((w >> 4i) & 0x000F000F | 0x43004300) − (128 + z) must give exactly q − z for both.
// Padding (rows >= n, columns >= k) must dequantize to exactly 0.
TEST(W4Layout, WordsAreMmaFragments) {
  for (int group : {-1, 32}) {
    const int n = 37, k = 150, bits = 4;
    const PackedQuantWeights p = random_quantized(n, k, bits, group, 77);
    const QuantizedMatrix u = unpack_quantized(p);
    const cuda::W4Layout l = cuda::w4_prepare(p);
    const int kblocks = l.k_pad / 64, glen = p.group_len(), G = p.groups();
    int checked = 0;
    for (int tile = 0; tile < l.n_pad / 16; ++tile)
      for (int kb = 0; kb < kblocks; ++kb)
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < 4; ++j) {
            const uint32_t w = l.q[((size_t(tile) * kblocks + kb) * 32 + lane) * 4 + j];
            const int g = lane / 4, t = lane % 4;
            for (int i = 0; i < 4; ++i) {
              const int row = tile * 16 + g + (i % 2 ? 8 : 0);
              const int col = kb * 64 + j * 16 + 2 * t + (i >= 2 ? 8 : 0);
              const uint32_t pair = ((w >> (4 * i)) & 0x000F000Fu) | 0x43004300u;
              const int grp = std::min(col / glen, G - 1);
              const uint16_t zb = l.zeros[size_t(grp) * l.n_pad + row];
              for (int e = 0; e < 2; ++e) {
                const float v = bf16_to_f32(uint16_t(pair >> (16 * e))) - bf16_to_f32(zb);
                const int c = col + e;
                if (row < n && c < k) {
                  const int q = u.q[size_t(row) * k + c], z = u.zeros[size_t(row) * G + c / glen];
                  ASSERT_EQ(v, float(q - z)) << "group " << group << " row " << row << " col " << c;
                } else {
                  ASSERT_EQ(v, 0.f) << "padding at row " << row << " col " << c << " is not a zero weight";
                }
                ++checked;
              }
            }
          }
    EXPECT_EQ(checked, l.n_pad * l.k_pad);
  }
}

TEST(W4Layout, SupportedFormats) {
  EXPECT_TRUE(cuda::w4_supported(random_quantized(16, 64, 4, -1, 1)));
  EXPECT_TRUE(cuda::w4_supported(random_quantized(16, 64, 2, 16, 2)));
  EXPECT_TRUE(cuda::w4_supported(random_quantized(16, 256, 3, 128, 3)));
  const PackedQuantWeights eight = random_quantized(16, 64, 8, -1, 4);  // 8-bit container
  EXPECT_FALSE(cuda::w4_supported(eight));
  EXPECT_THROW(cuda::w4_prepare(eight), Error);
  const PackedQuantWeights odd_group = random_quantized(16, 96, 4, 24, 5);
  EXPECT_FALSE(cuda::w4_supported(odd_group));
  EXPECT_THROW(cuda::w4_prepare(odd_group), Error);
}

// ================================================================ kernels (GPU)

TEST(W4A16Reference, MatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  const std::pair<int, int> shapes[] = {{1, 16}, {17, 64}, {100, 70}, {513, 1000}, {64, 4096}};
  uint32_t seed = 100;
  for (auto [n, k] : shapes)
    for (int group : {-1, 32, 64, 128}) {
      const PackedQuantWeights p = random_quantized(n, k, 4, group, seed++);
      UploadedW4 w(cuda::w4_prepare(p));
      bool with_bias = group > 0;
      for (int m : {1, 3, 9, 33}) {
        with_bias = !with_bias;
        const std::vector<uint16_t> xb = random_bf16(size_t(m) * k, seed++);
        const std::vector<uint16_t> bb = random_bf16(n, seed++, 0.1f);
        const std::vector<float> xf = to_f32(xb), bf32 = to_f32(bb);
        std::vector<float> ref(size_t(m) * n);
        quant_linear_reference(xf.data(), m, p, with_bias ? bf32.data() : nullptr, ref.data());
        W4DevBuf<uint16_t> x(xb), bias(bb);
        const std::vector<float> got = run_reference(x, m, w.dev, with_bias ? bf(bias) : nullptr);
        EXPECT_LT(rel_err(got, ref), 2e-5) << shape_name(n, k, group, 4) << " m=" << m << " bias=" << with_bias;
      }
    }
}

namespace {

// Fast kernel vs reference kernel over one weight matrix and every m of the list; sm_counts: the plans to
// try (the real SM count first).
void check_fast_against_reference(int n, int k, int group, int bits, const std::vector<int>& ms,
                                  const std::vector<int>& sm_counts, uint32_t seed) {
  const PackedQuantWeights p = random_quantized(n, k, bits, group, seed);
  UploadedW4 w(cuda::w4_prepare(p));
  const std::string shape = shape_name(n, k, group, bits);
  const int max_m = *std::max_element(ms.begin(), ms.end());
  size_t ws_bytes = 0;
  for (int sm : sm_counts) ws_bytes = std::max(ws_bytes, cuda::w4a16_workspace_bytes(max_m, n, k, sm));
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  const std::vector<uint16_t> bb = random_bf16(n, seed + 1, 0.1f);
  W4DevBuf<uint16_t> bias(bb);
  for (size_t mi = 0; mi < ms.size(); ++mi) {
    const int m = ms[mi];
    const bool with_bias = (mi + size_t(n)) % 2 == 0;
    const __nv_bfloat16* b = with_bias ? bf(bias) : nullptr;
    W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, seed + 2 + uint32_t(mi)));
    const std::vector<float> ref = run_reference(x, m, w.dev, b);
    for (int sm : sm_counts) {
      const std::string what = shape + " m=" + std::to_string(m) + " bias=" + std::to_string(with_bias) +
                               " sm_count=" + std::to_string(sm);
      std::vector<uint16_t> first, second;
      const std::vector<float> got = run_fast(x, m, w.dev, b, ws.get(), ws_bytes, sm, what, &first);
      run_fast(x, m, w.dev, b, ws.get(), ws_bytes, sm, what + " (second run)", &second);
      EXPECT_LT(rel_err(got, ref), 1e-2) << what;
      EXPECT_TRUE(first == second) << what << ": two runs differ (race in the split-K reduction?)";
      if (::testing::Test::HasFailure()) return;  // one broken shape is enough to read
    }
  }
  // The split-K arrival counters (the workspace's first words, one per 128-feature row group) are back at 0.
  const int row_groups = (n + 127) / 128;
  std::vector<unsigned> counters(row_groups);
  SPEAR_CUDA_CHECK(cudaMemcpy(counters.data(), ws.get(), row_groups * sizeof(unsigned), cudaMemcpyDeviceToHost));
  for (int i = 0; i < row_groups; ++i) EXPECT_EQ(counters[i], 0u) << shape << ": counter " << i << " left set";
}

const std::vector<int> kAllM = {1, 2, 3, 4, 7, 8, 9, 16, 31, 32, 64, 100, 128, 129, 300};

}  // namespace

TEST(W4A16Gemm, SmallShapesMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  uint32_t seed = 1000;
  for (int n : {1, 17, 100, 513})
    for (int k : {16, 64, 70, 1000})
      for (int group : {-1, 16, 32, 64, 128}) {
        check_fast_against_reference(n, k, group, 4, kAllM, {sms, 1000}, seed);
        seed += 100;
        if (HasFailure()) return;
      }
}

TEST(W4A16Gemm, LowBitCodesMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  check_fast_against_reference(100, 1000, 32, 2, {1, 9, 33, 129}, {sms}, 5);
  check_fast_against_reference(513, 256, -1, 3, {1, 9, 33, 129}, {sms}, 6);
}

TEST(W4A16Gemm, LargeShapesMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  struct Case {
    int n, k, group;
  };
  const Case cases[] = {{4096, 4096, -1},  {4096, 4096, 128}, {4096, 14336, -1}, {4096, 14336, 128},
                        {513, 14336, 32},  {100, 4096, 64},   {14336, 4096, 128}, {1024, 4096, -1}};
  uint32_t seed = 9000;
  for (const Case& c : cases) {
    check_fast_against_reference(c.n, c.k, c.group, 4, kAllM, {sms, 7}, seed);
    seed += 100;
    if (HasFailure()) return;
  }
}

// No workspace: no split-K, same results; a misaligned x (the non-cp.async staging path); m = 0 is a no-op.
TEST(W4A16Gemm, NoWorkspaceMisalignedXAndEmpty) {
  SKIP_WITHOUT_GPU();
  const int n = 512, k = 2048, m = 5;
  const int sms = cuda::device_info(0).sm_count;
  const PackedQuantWeights p = random_quantized(n, k, 4, 128, 42);
  UploadedW4 w(cuda::w4_prepare(p));
  W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k + 8, 43));
  const std::vector<float> ref = run_reference(x, m, w.dev, nullptr);
  const std::vector<float> got = run_fast(x, m, w.dev, nullptr, nullptr, 0, sms, "no workspace");
  EXPECT_LT(rel_err(got, ref), 1e-2);

  // x shifted by one element: still k elements per row, but not 16-byte aligned.
  W4DevBuf<uint16_t> xs(size_t(m) * k + 1);
  SPEAR_CUDA_CHECK(cudaMemcpy(xs.get() + 1, x.get(), size_t(m) * k * 2, cudaMemcpyDeviceToDevice));
  W4DevBuf<float> yref(size_t(m) * n);
  cuda::w4a16_gemm_reference(bf(xs) + 1, m, w.dev, nullptr, yref.get(), nullptr);
  W4DevBuf<uint16_t> y(size_t(m) * n);
  SPEAR_CUDA_CHECK(cudaMemset(y.get(), 0xff, size_t(m) * n * 2));
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(m, n, k, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  cuda::w4a16_gemm(bf(xs) + 1, m, w.dev, nullptr, bf_mut(y), ws.get(), ws_bytes, sms, nullptr);
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> ref2 = yref.download();
  std::vector<float> got2 = to_f32(y.download());
  for (float v : got2) ASSERT_TRUE(std::isfinite(v)) << "misaligned x: output not written";
  EXPECT_LT(rel_err(got2, ref2), 1e-2) << "misaligned x";

  cuda::w4a16_gemm(bf(x), 0, w.dev, nullptr, bf_mut(y), ws.get(), ws_bytes, sms, nullptr);  // nothing to do
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
}

// Captured in a CUDA graph (no allocation, memset or sync inside; relaxed mode as CudaBackend) and replayed:
// same bits as eager runs, and the shared workspace keeps working across GEMMs of different shapes.
TEST(W4A16Gemm, GraphReplayEqualsEager) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  const PackedQuantWeights pa = random_quantized(512, 2048, 4, -1, 7), pb = random_quantized(2048, 512, 4, 64, 8);
  UploadedW4 a(cuda::w4_prepare(pa)), b(cuda::w4_prepare(pb));
  const int m = 3;
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(m, 2048, 2048, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  W4DevBuf<uint16_t> x(random_bf16(size_t(m) * 2048, 9)), ya(size_t(m) * 512), yb(size_t(m) * 2048);
  // Eager: x [3, 2048] → ya [3, 512] → yb [3, 2048].
  std::vector<uint16_t> eager_a, eager_b;
  run_fast(x, m, a.dev, nullptr, ws.get(), ws_bytes, sms, "eager a", &eager_a);
  SPEAR_CUDA_CHECK(cudaMemcpy(ya.get(), eager_a.data(), eager_a.size() * 2, cudaMemcpyHostToDevice));
  run_fast(ya, m, b.dev, nullptr, ws.get(), ws_bytes, sms, "eager b", &eager_b);

  cudaStream_t s;
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  SPEAR_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
  cuda::w4a16_gemm(bf(x), m, a.dev, nullptr, bf_mut(ya), ws.get(), ws_bytes, sms, s);
  cuda::w4a16_gemm(bf(ya), m, b.dev, nullptr, bf_mut(yb), ws.get(), ws_bytes, sms, s);
  SPEAR_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  SPEAR_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 3; ++rep) {
    SPEAR_CUDA_CHECK(cudaMemsetAsync(ya.get(), 0xff, ya.size() * 2, s));
    SPEAR_CUDA_CHECK(cudaMemsetAsync(yb.get(), 0xff, yb.size() * 2, s));
    SPEAR_CUDA_CHECK(cudaGraphLaunch(exec, s));
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
    EXPECT_TRUE(ya.download() == eager_a) << "replay " << rep << ": first GEMM differs from the eager run";
    EXPECT_TRUE(yb.download() == eager_b) << "replay " << rep << ": second GEMM differs from the eager run";
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

}  // namespace spear

// ================================================================ decode kernel, grouped launch, PDL, shared workspace

namespace spear {

TEST(W4A16Options, SetGetAndValidate) {
  const cuda::W4GemmOptions saved = cuda::w4a16_get_options();
  cuda::W4GemmOptions o;
  o.pdl = false;
  o.path = 2;
  o.decode_rows = 4;
  o.decode_splits = 3;
  cuda::w4a16_set_options(o);
  const cuda::W4GemmOptions got = cuda::w4a16_get_options();
  EXPECT_EQ(got.pdl, false);
  EXPECT_EQ(got.path, 2);
  EXPECT_EQ(got.decode_rows, 4);
  EXPECT_EQ(got.decode_splits, 3);
  cuda::W4GemmOptions bad;
  bad.decode_rows = 3;
  EXPECT_THROW(cuda::w4a16_set_options(bad), Error);
  bad = {};
  bad.decode_splits = 9;
  EXPECT_THROW(cuda::w4a16_set_options(bad), Error);
  bad = {};
  bad.path = 3;
  EXPECT_THROW(cuda::w4a16_set_options(bad), Error);
  cuda::w4a16_set_options(saved);
}

// Every decode-kernel plan shape (row tiles per CTA R × cluster size S, including plans with idle warps and
// idle CTAs) against the reference, per channel and grouped, m = 1..32 (token tiles T = 1, 2, 4).
TEST(W4A16Decode, ForcedPlansMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  struct Case {
    int n, k, group;
  };
  const Case cases[] = {{100, 1000, -1}, {513, 1000, 32}, {1024, 4096, 128}, {2048, 512, -1}, {40, 64, 16}};
  const std::pair<int, int> plans[] = {{1, 1}, {2, 3}, {4, 8}, {8, 2}, {8, 8}, {1, 8}, {8, 1}, {2, 5}};
  uint32_t seed = 20000;
  for (const Case& c : cases)
    for (auto [R, S] : plans) {
      cuda::W4GemmOptions o;
      o.decode_rows = R;
      o.decode_splits = S;
      ScopedW4Options scoped(o);
      SCOPED_TRACE("R=" + std::to_string(R) + " S=" + std::to_string(S));
      check_fast_against_reference(c.n, c.k, c.group, 4, {1, 2, 5, 8, 9, 16, 17, 32}, {sms}, seed);
      seed += 100;
      if (HasFailure()) return;
    }
}

// The bulk-copy kernel (decode_rows = -1) against the reference: per channel and grouped (groups of 16 change
// inside a k-block), k not a multiple of 64, a last stage shorter than the others, more chunks than stages (the
// ring wraps), grouped launches of 3 matrices with bias, m = 1..8 (and m > 8, where the planner's kernel runs).
TEST(W4A16Decode, BulkKernelMatchesReference) {
  SKIP_WITHOUT_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  const int sms = cuda::device_info(0).sm_count;
  cuda::W4GemmOptions o;
  o.decode_rows = -1;
  ScopedW4Options scoped(o);
  struct Case {
    int n, k, group;
  };
  const Case cases[] = {{100, 1000, -1}, {513, 1000, 32}, {1024, 4096, 128}, {48, 4000, 16},
                        {64, 14336, 128}, {40, 64, 16},    {272, 8256, -1}};
  uint32_t seed = 20700;
  for (const Case& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " group=" + std::to_string(c.group));
    UploadedW4 w(cuda::w4_prepare(random_quantized(c.n, c.k, 4, c.group, seed)));
    EXPECT_EQ(cuda::w4a16_decode_plan(1, &w.dev, 1, sms).first, -1);
    check_fast_against_reference(c.n, c.k, c.group, 4, {1, 2, 5, 8, 9}, {sms}, seed);
    seed += 100;
    if (HasFailure()) return;
  }
}

// Every instance of the bulk kernel (bulk_min_blocks 0 = by occupancy, 2-4 the plain ones) sums in the same order
// as the compensator instance (1), which plain launches ran before: the outputs are equal bit for bit, and right
// against the reference. Per channel and grouped (groups of 16 inside a k-block), a ring that wraps, m = 1..8.
TEST(W4A16Decode, BulkInstancesAreBitIdentical) {
  SKIP_WITHOUT_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  const int sms = cuda::device_info(0).sm_count;
  struct Case {
    int n, k, group;
  };
  const Case cases[] = {{100, 1000, -1}, {513, 1000, 32}, {1024, 4096, 128}, {48, 4000, 16}, {272, 14336, 128}};
  uint32_t seed = 20800;
  for (const Case& c : cases) {
    UploadedW4 w(cuda::w4_prepare(random_quantized(c.n, c.k, 4, c.group, seed)));
    for (int m : {1, 3, 8}) {
      if (m * c.k > 8 * 4096) continue;  // every CTA stages all of x: 8 tokens of k = 14336 do not fit
      const std::string shape = "n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " group=" +
                                std::to_string(c.group) + " m=" + std::to_string(m);
      W4DevBuf<uint16_t> x(random_bf16(size_t(m) * c.k, seed + uint32_t(m)));
      const std::vector<float> ref = run_reference(x, m, w.dev, nullptr);
      std::vector<uint16_t> base;
      for (int inst : {1, 0, 2, 3, 4}) {
        const std::string what = shape + " instance " + std::to_string(inst);
        cuda::W4GemmOptions o;
        o.decode_rows = -1;
        o.bulk_min_blocks = inst;
        ScopedW4Options scoped(o);
        ASSERT_EQ(cuda::w4a16_decode_plan(m, &w.dev, 1, sms).first, -1) << what;
        std::vector<uint16_t> got;
        EXPECT_LT(rel_err(run_fast(x, m, w.dev, nullptr, nullptr, 0, sms, what, &got), ref), 1e-2) << what;
        if (inst == 1)
          base = got;
        else
          EXPECT_TRUE(got == base) << what << ": differs from the compensator instance";
        if (HasFailure()) return;
      }
    }
    seed += 100;
  }
}

// Tuning picks a plan per launch shape (token tiles, matrices) and later launches of that shape use it: still
// right, whichever plan won; forgetting the plans works.
TEST(W4A16Decode, TunedPlansMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  cuda::w4a16_clear_tuning();
  W4DevBuf<unsigned char> flush(size_t(8) << 20);
  uint32_t seed = 21000;
  for (int group : {-1, 64}) {
    const int n = 777, k = 1536;
    UploadedW4 w(cuda::w4_prepare(random_quantized(n, k, 4, group, seed)));
    for (int m : {1, 9, 17}) {
      W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, seed + uint32_t(m)));
      W4DevBuf<uint16_t> y(size_t(m) * n);
      __nv_bfloat16* yp = bf_mut(y);
      EXPECT_FALSE(cuda::w4a16_decode_tuned(m, &w.dev, 1));
      EXPECT_TRUE(cuda::w4a16_tune_decode(bf(x), m, &w.dev, 1, &yp, flush.get(), size_t(8) << 20, sms, nullptr, 2));
      EXPECT_TRUE(cuda::w4a16_decode_tuned(m, &w.dev, 1));
      const std::string what = "group " + std::to_string(group) + " m " + std::to_string(m);
      const std::vector<float> got = run_fast(x, m, w.dev, nullptr, nullptr, 0, sms, what, nullptr);
      EXPECT_LT(rel_err(got, run_reference(x, m, w.dev, nullptr)), 1e-2) << what;
    }
    // m = 33 is not the decode kernel's: nothing to tune.
    W4DevBuf<uint16_t> x33(random_bf16(size_t(33) * k, seed)), y33(size_t(33) * n);
    __nv_bfloat16* y33p = bf_mut(y33);
    EXPECT_FALSE(cuda::w4a16_tune_decode(bf(x33), 33, &w.dev, 1, &y33p, nullptr, 0, sms, nullptr));
    EXPECT_TRUE(cuda::w4a16_decode_tuned(33, &w.dev, 1));
    seed += 100;
  }
  cuda::w4a16_clear_tuning();
  UploadedW4 w(cuda::w4_prepare(random_quantized(777, 1536, 4, -1, 21000)));
  EXPECT_FALSE(cuda::w4a16_decode_tuned(1, &w.dev, 1));
}

// With a workspace, tuning a plain launch of more than 16 tokens also times the general kernel, and where that wins
// (likely on the 8B down_proj shape at 32 tokens) single and grouped launches run it at that m: right against the
// reference whichever won, the other m of the token tiles right too, and the tuning reported by w4a16_decode_plan
// (R = 0: the general kernel).
TEST(W4A16Decode, TunedGeneralPlansMatchReference) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  cuda::w4a16_clear_tuning();
  W4DevBuf<unsigned char> flush(size_t(8) << 20);
  const int k = 14336;
  UploadedW4 a(cuda::w4_prepare(random_quantized(4096, k, 4, 128, 21500)));
  UploadedW4 b(cuda::w4_prepare(random_quantized(1000, k, 4, 128, 21501)));
  const cuda::W4Device devs[2] = {a.dev, b.dev};
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(128, 4096, k, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  // Output buffers of the first `count` matrices at m tokens, and their pointers.
  struct Outputs {
    std::vector<std::unique_ptr<W4DevBuf<uint16_t>>> bufs;
    std::vector<__nv_bfloat16*> ptrs;
  };
  auto outputs = [&](int count, int m) {
    Outputs o;
    for (int i = 0; i < count; ++i) {
      o.bufs.push_back(std::make_unique<W4DevBuf<uint16_t>>(size_t(m) * devs[i].n));
      o.ptrs.push_back(bf_mut(*o.bufs.back()));
    }
    return o;
  };
  for (int count : {1, 2}) {
    for (int m : {17, 32}) {
      const std::string what = "count " + std::to_string(count) + " m " + std::to_string(m);
      W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, 21510 + uint32_t(m)));
      Outputs y = outputs(count, m);
      ASSERT_TRUE(cuda::w4a16_tune_decode(bf(x), m, devs, count, y.ptrs.data(), flush.get(), size_t(8) << 20, sms,
                                          nullptr, 2, nullptr, nullptr, nullptr, ws.get(), ws_bytes))
          << what;
      const auto plan = cuda::w4a16_decode_plan(m, devs, count, sms);
      const std::string name =
          plan.first == 0 ? "general" : "R" + std::to_string(plan.first) + "S" + std::to_string(plan.second);
      std::printf("tuned plan, %s: %s\n", what.c_str(), name.c_str());
      for (int mm : {m, m - 1}) {  // the tuned m, and another m of the same token tiles
        W4DevBuf<uint16_t> xx(random_bf16(size_t(mm) * k, 21520 + uint32_t(mm)));
        Outputs yy = outputs(count, mm);
        cuda::w4a16_gemm_grouped(bf(xx), mm, devs, count, nullptr, yy.ptrs.data(), ws.get(), ws_bytes, sms, nullptr);
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        for (int i = 0; i < count; ++i) {
          std::vector<float> got;
          for (uint16_t v : yy.bufs[i]->download()) got.push_back(bf16_to_f32(v));
          EXPECT_LT(rel_err(got, run_reference(xx, mm, devs[i], nullptr)), 1e-2)
              << what << " run at m " << mm << " matrix " << i;
        }
      }
    }
  }
  cuda::w4a16_clear_tuning();
}

// The general (split-K through the workspace) kernel is still right at small m, where the decode kernel
// normally runs.
TEST(W4A16Gemm, GeneralPathAtSmallM) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  cuda::W4GemmOptions o;
  o.path = 2;
  ScopedW4Options scoped(o);
  check_fast_against_reference(1024, 4096, -1, 4, {1, 8, 16, 32}, {sms, 1000}, 31000);
  check_fast_against_reference(513, 1000, 64, 4, {1, 3, 16, 31}, {sms, 1000}, 31100);
}

// GEMMs of different n sharing one workspace, many launches back to back over rotating copies of the weights
// (as the benchmark and the backend do). Regression: the split-K arrival counters used to start the partial
// sums right after the launch's own counters, so a narrow GEMM's partials overwrote the counters of a wider
// one's (row groups >= 64, n > 8192) and the wide GEMM left rows unwritten or wrong.
TEST(W4A16Gemm, BackToBackRotatingWeightsSharedWorkspace) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  const int k = 4096, n_small = 1024, n_wide = 9216, copies = 3;
  const PackedQuantWeights ps = random_quantized(n_small, k, 4, -1, 40), pw = random_quantized(n_wide, k, 4, 128, 41);
  const cuda::W4Layout ls = cuda::w4_prepare(ps), lw = cuda::w4_prepare(pw);
  std::vector<std::unique_ptr<UploadedW4>> small, wide;
  for (int c = 0; c < copies; ++c) {
    small.push_back(std::make_unique<UploadedW4>(ls));
    wide.push_back(std::make_unique<UploadedW4>(lw));
  }
  const int max_m = 40;
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(max_m, n_wide, k, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  for (int path : {0, 2})
    for (bool pdl : {true, false})
      for (int m : {1, 16, 40}) {
        cuda::W4GemmOptions o;
        o.path = path;
        o.pdl = pdl;
        ScopedW4Options scoped(o);
        const std::string what = "path " + std::to_string(path) + " pdl " + std::to_string(pdl) + " m " +
                                 std::to_string(m);
        W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, 42 + uint32_t(m)));
        const std::vector<float> ref_s = run_reference(x, m, small[0]->dev, nullptr);
        const std::vector<float> ref_w = run_reference(x, m, wide[0]->dev, nullptr);
        constexpr int kLaunches = 24;  // small, wide, small, wide, ... over the copies, no sync in between
        std::vector<std::unique_ptr<W4DevBuf<uint16_t>>> ys;
        for (int i = 0; i < kLaunches; ++i) {
          const bool is_wide = i % 2 == 1;
          const size_t ny = size_t(m) * (is_wide ? n_wide : n_small);
          ys.push_back(poisoned_y(ny));
          const cuda::W4Device& w = (is_wide ? wide : small)[(i / 2) % copies]->dev;
          cuda::w4a16_gemm(bf(x), m, w, nullptr, bf_mut(*ys.back()), ws.get(), ws_bytes, sms, nullptr);
        }
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        for (int i = 0; i < kLaunches; ++i) {
          const bool is_wide = i % 2 == 1;
          const size_t ny = size_t(m) * (is_wide ? n_wide : n_small);
          const std::vector<float> got = check_poisoned(*ys[i], ny, what + " launch " + std::to_string(i));
          EXPECT_LT(rel_err(got, is_wide ? ref_w : ref_s), 1e-2) << what << " launch " << i;
        }
        std::vector<unsigned> counters(n_wide / 128);
        SPEAR_CUDA_CHECK(cudaMemcpy(counters.data(), ws.get(), counters.size() * 4, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < counters.size(); ++i) EXPECT_EQ(counters[i], 0u) << what << ": counter " << i;
        if (HasFailure()) return;
      }
}

// A chain of dependent GEMMs (each reads the previous one's output) run with and without programmatic
// dependent launch: bit-identical, and PDL never lets a GEMM read its input before the producer finished.
TEST(W4A16Gemm, PdlOnOffBitIdentical) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  const PackedQuantWeights pa = random_quantized(2048, 1024, 4, -1, 50), pb = random_quantized(1024, 2048, 4, 64, 51);
  UploadedW4 a(cuda::w4_prepare(pa)), b(cuda::w4_prepare(pb));
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(128, 2048, 2048, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  cudaStream_t s;
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int m : {1, 7, 16, 32, 64}) {
    W4DevBuf<uint16_t> x0(random_bf16(size_t(m) * 1024, 52 + uint32_t(m), 0.5f));
    W4DevBuf<uint16_t> h1(size_t(m) * 2048), h2(size_t(m) * 1024);
    std::vector<uint16_t> results[2];
    for (bool pdl : {false, true}) {
      cuda::W4GemmOptions o;
      o.pdl = pdl;
      ScopedW4Options scoped(o);
      SPEAR_CUDA_CHECK(cudaMemsetAsync(h1.get(), 0xff, h1.size() * 2, s));
      SPEAR_CUDA_CHECK(cudaMemsetAsync(h2.get(), 0xff, h2.size() * 2, s));
      // x0 → h1 → h2 → h1 → h2 ..., 10 rounds: a stale read of a poisoned (NaN) buffer would poison the end.
      for (int round = 0; round < 10; ++round) {
        cuda::w4a16_gemm(round == 0 ? bf(x0) : bf(h2), m, a.dev, nullptr, bf_mut(h1), ws.get(), ws_bytes, sms, s);
        cuda::w4a16_gemm(bf(h1), m, b.dev, nullptr, bf_mut(h2), ws.get(), ws_bytes, sms, s);
      }
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
      results[pdl] = h2.download();
      size_t bad = 0;
      for (uint16_t v : results[pdl]) bad += !std::isfinite(bf16_to_f32(v));
      EXPECT_EQ(bad, 0u) << "m " << m << " pdl " << pdl << ": non-finite outputs";
    }
    EXPECT_TRUE(results[0] == results[1]) << "m " << m << ": PDL on and off differ";
    if (HasFailure()) break;
  }
  cudaStreamDestroy(s);
}

namespace {

// Grouped launch vs the reference and vs separate calls, over several m.
void check_grouped(const std::vector<int>& ns, int k, const std::vector<int>& groups, uint32_t seed) {
  const int sms = cuda::device_info(0).sm_count;
  const int count = int(ns.size());
  std::vector<std::unique_ptr<UploadedW4>> mats;
  std::vector<cuda::W4Device> devs;
  std::vector<std::unique_ptr<W4DevBuf<uint16_t>>> biases;
  int max_n = 0;
  for (int i = 0; i < count; ++i) {
    mats.push_back(std::make_unique<UploadedW4>(cuda::w4_prepare(random_quantized(ns[i], k, 4, groups[i], seed + i))));
    devs.push_back(mats.back()->dev);
    biases.push_back(std::make_unique<W4DevBuf<uint16_t>>(random_bf16(ns[i], seed + 10 + i, 0.1f)));
    max_n = std::max(max_n, ns[i]);
  }
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(300, max_n, k, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  for (int m : {1, 3, 8, 9, 16, 32, 33, 130}) {
    W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, seed + 20 + uint32_t(m)));
    // bias: all, none, or every other matrix
    for (int bias_mode : {0, 1, 2}) {
      std::vector<const __nv_bfloat16*> bptr(count, nullptr);
      for (int i = 0; i < count; ++i)
        if (bias_mode == 0 || (bias_mode == 2 && i % 2 == 0)) bptr[i] = bf(*biases[i]);
      std::vector<std::unique_ptr<W4DevBuf<uint16_t>>> yg, ys;
      std::vector<__nv_bfloat16*> yptr;
      for (int i = 0; i < count; ++i) {
        yg.push_back(poisoned_y(size_t(m) * ns[i]));
        ys.push_back(poisoned_y(size_t(m) * ns[i]));
        yptr.push_back(bf_mut(*yg.back()));
      }
      cuda::w4a16_gemm_grouped(bf(x), m, devs.data(), count, bias_mode == 1 ? nullptr : bptr.data(), yptr.data(),
                               ws.get(), ws_bytes, sms, nullptr);
      for (int i = 0; i < count; ++i)
        cuda::w4a16_gemm(bf(x), m, devs[i], bptr[i], bf_mut(*ys[i]), ws.get(), ws_bytes, sms, nullptr);
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      for (int i = 0; i < count; ++i) {
        const std::string what = "grouped matrix " + std::to_string(i) + " n " + std::to_string(ns[i]) + " m " +
                                 std::to_string(m) + " bias mode " + std::to_string(bias_mode);
        std::vector<uint16_t> raw_g, raw_s;
        const size_t ny = size_t(m) * ns[i];
        const std::vector<float> got = check_poisoned(*yg[i], ny, what, &raw_g);
        const std::vector<float> sep = check_poisoned(*ys[i], ny, what + " (separate)", &raw_s);
        const std::vector<float> ref = run_reference(x, m, devs[i], bptr[i]);
        EXPECT_LT(rel_err(got, ref), 1e-2) << what;
        EXPECT_LT(rel_err(got, sep), 1e-2) << what << " vs separate calls";
        if (m > 32) {
          EXPECT_TRUE(raw_g == raw_s) << what << ": m > 32 runs separate GEMMs, bits must match";
        }
      }
      if (::testing::Test::HasFailure()) return;
    }
  }
}

}  // namespace

TEST(W4A16Grouped, QkvAndGateUpMatchSeparateCalls) {
  SKIP_WITHOUT_GPU();
  check_grouped({512, 128, 128}, 1024, {-1, -1, -1}, 60000);     // q/k/v, per channel
  check_grouped({512, 128, 128}, 1024, {128, 128, 128}, 60100);  // q/k/v, g128
  check_grouped({1000, 1000}, 777, {64, 64}, 60200);             // gate/up, odd n and k
  check_grouped({100, 17, 513, 64}, 256, {-1, -1, -1, -1}, 60300);
  check_grouped({256, 300}, 512, {-1, 32}, 60400);  // mixed kinds: separate launches
  check_grouped({300}, 512, {32}, 60500);           // count 1
}

// The same through the bulk-copy kernel (m <= 8; the planner's kernel above): one CTA per tile of any member.
TEST(W4A16Grouped, BulkKernelMatchesSeparateCalls) {
  SKIP_WITHOUT_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  cuda::W4GemmOptions o;
  o.decode_rows = -1;
  ScopedW4Options scoped(o);
  check_grouped({512, 128, 128}, 1024, {-1, -1, -1}, 61000);
  check_grouped({512, 128, 128}, 2048, {128, 128, 128}, 61100);
  check_grouped({1000, 1000}, 777, {64, 64}, 61200);
  check_grouped({100, 17, 513, 64}, 256, {-1, -1, -1, -1}, 61300);
}

TEST(W4A16Grouped, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  UploadedW4 a(cuda::w4_prepare(random_quantized(64, 128, 4, -1, 70)));
  UploadedW4 b(cuda::w4_prepare(random_quantized(64, 256, 4, -1, 71)));
  W4DevBuf<uint16_t> x(random_bf16(256, 72)), y0(64), y1(64);
  cuda::W4Device devs[5] = {a.dev, b.dev, a.dev, a.dev, a.dev};
  __nv_bfloat16* ys[5] = {bf_mut(y0), bf_mut(y1), bf_mut(y0), bf_mut(y0), bf_mut(y0)};
  EXPECT_THROW(cuda::w4a16_gemm_grouped(bf(x), 1, devs, 2, nullptr, ys, nullptr, 0, 132, nullptr), Error);  // k
  EXPECT_THROW(cuda::w4a16_gemm_grouped(bf(x), 1, devs, 5, nullptr, ys, nullptr, 0, 132, nullptr), Error);  // count
  cuda::w4a16_gemm_grouped(bf(x), 0, devs, 2, nullptr, ys, nullptr, 0, 132, nullptr);  // m = 0: nothing
  SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
}

// Grouped launches and dependent GEMMs captured in a graph (PDL edges inside the graph) and replayed: same
// bits as the eager run.
TEST(W4A16Grouped, GraphReplayEqualsEager) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  const int k = 1024, m = 2;
  UploadedW4 q(cuda::w4_prepare(random_quantized(1024, k, 4, 128, 80)));
  UploadedW4 kk(cuda::w4_prepare(random_quantized(256, k, 4, 128, 81)));
  UploadedW4 v(cuda::w4_prepare(random_quantized(256, k, 4, 128, 82)));
  UploadedW4 o(cuda::w4_prepare(random_quantized(k, 1024, 4, 128, 83)));
  const cuda::W4Device devs[3] = {q.dev, kk.dev, v.dev};
  W4DevBuf<uint16_t> x(random_bf16(size_t(m) * k, 84)), yq(size_t(m) * 1024), yk(size_t(m) * 256),
      yv(size_t(m) * 256), yo(size_t(m) * k);
  __nv_bfloat16* ys[3] = {bf_mut(yq), bf_mut(yk), bf_mut(yv)};
  const size_t ws_bytes = cuda::w4a16_workspace_bytes(m, 1024, k, sms);
  W4DevBuf<unsigned char> ws(ws_bytes);
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
  cudaStream_t s;
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto enqueue = [&]() {
    cuda::w4a16_gemm_grouped(bf(x), m, devs, 3, nullptr, ys, ws.get(), ws_bytes, sms, s);
    cuda::w4a16_gemm(bf(yq), m, o.dev, nullptr, bf_mut(yo), ws.get(), ws_bytes, sms, s);  // reads q's output
  };
  enqueue();
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
  const std::vector<uint16_t> eq = yq.download(), ek = yk.download(), ev = yv.download(), eo = yo.download();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  SPEAR_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
  enqueue();
  SPEAR_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  SPEAR_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 3; ++rep) {
    for (auto* b : {&yq, &yk, &yv, &yo}) SPEAR_CUDA_CHECK(cudaMemsetAsync(b->get(), 0xff, b->size() * 2, s));
    SPEAR_CUDA_CHECK(cudaGraphLaunch(exec, s));
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
    EXPECT_TRUE(yq.download() == eq) << "replay " << rep << ": q";
    EXPECT_TRUE(yk.download() == ek) << "replay " << rep << ": k";
    EXPECT_TRUE(yv.download() == ev) << "replay " << rep << ": v";
    EXPECT_TRUE(yo.download() == eo) << "replay " << rep << ": o (reads q inside the graph)";
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

// ================================================================ dequantization (prefill path)

// w4a16_dequantize writes bf16(scale · (code − zero)) of every weight, bit for bit the CPU dequantization
// rounded to bf16, on odd shapes and every group size; nothing past the matrix.
TEST(W4A16Dequant, BitExactAgainstCpuDequantization) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 7000;
  for (int n : {1, 17, 100, 513})
    for (int k : {16, 64, 70, 1000})
      for (int group : {-1, 16, 32, 128}) {
        const PackedQuantWeights p = random_quantized(n, k, group == 32 ? 3 : 4, group, seed++);
        UploadedW4 w(cuda::w4_prepare(p));
        const size_t count = size_t(n) * k;
        W4DevBuf<uint16_t> out(count + kCanary);
        SPEAR_CUDA_CHECK(cudaMemset(out.get(), 0xff, (count + kCanary) * 2));
        cuda::w4a16_dequantize(w.dev, bf_mut(out), nullptr);
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<uint16_t> got = out.download();
        const std::vector<float> ref = unpack_quantized(p).dequantize();
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < count; ++i)
          if (got[i] != f32_to_bf16(ref[i]) && bad++ == 0) first = i;
        EXPECT_EQ(bad, 0u) << shape_name(n, k, group, p.bits) << ": first at row " << first / k << " col "
                           << first % k << ": got " << bf16_to_f32(got[first]) << " want " << ref[first];
        for (size_t i = count; i < count + kCanary; ++i)
          if (got[i] != kPoisonBf16) {
            ADD_FAILURE() << shape_name(n, k, group, p.bits) << ": write past the end at +" << (i - count);
            break;
          }
        if (HasFailure()) return;
      }
}

}  // namespace spear
