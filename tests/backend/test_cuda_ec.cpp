// Error compensators on the GPU (issue 6): the fused path (A·x, gate and B inside the W4 decode launch) and
// the overlapped path (second stream, joined before one add) against the naive path (separate kernels) and a
// double-precision CPU reference (dequantized weights, compensator_apply_reference), on odd shapes, both
// grouping kinds, static and gated ECs, and token counts across the decode and prefill kernels. The EC term
// is made large (about a third of the output) so that a wrong or missing EC cannot pass.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "core/dtype.h"
#include "quant/quantizer.h"
#include "spear/compensator.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

#define SPEAR_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

// x rounded to bf16 (what the GPU sees), row-major [m, k].
std::vector<float> random_x(int m, int k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(size_t(m) * k);
  for (float& v : x) v = bf16_to_f32(f32_to_bf16(nd(rng)));
  return x;
}

// y = x·deq(W)ᵀ (+ the EC) in double.
std::vector<float> reference(const PackedQuantWeights& p, const Compensator* c, const std::vector<float>& x, int m) {
  const std::vector<float> w = unpack_quantized(p).dequantize();
  std::vector<float> y(size_t(m) * p.out, 0.f);
  for (int t = 0; t < m; ++t)
    for (int n = 0; n < p.out; ++n) {
      double s = 0;
      for (int k = 0; k < p.in; ++k) s += double(x[size_t(t) * p.in + k]) * w[size_t(n) * p.in + k];
      y[size_t(t) * p.out + n] = float(s);
    }
  if (c) compensator_apply_reference(*c, x.data(), m, y.data());
  return y;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> run(cuda::CudaBackend& gpu, const Linear& l, const Tensor& x, EcPath path) {
  gpu.set_ec_path(path);
  Tensor y = gpu.alloc(x.rows, l.out_features);
  gpu.linear(x, l, y);
  std::vector<float> h(size_t(y.numel()));
  gpu.download(y, h.data());
  return h;
}

// The fused path with the slice sum and the gate forced into every W4 CTA ([0]), then once into the last EC CTA ([1])
// (W4GemmOptions::ec_gate): the same plan either way.
std::array<std::vector<float>, 2> run_fused_each_gate_place(cuda::CudaBackend& gpu, const Linear& l, const Tensor& x) {
  std::array<std::vector<float>, 2> out;
  for (int gate : {1, 2}) {
    cuda::W4GemmOptions o = cuda::w4a16_get_options();
    o.ec_gate = gate;
    w4test::ScopedW4Options scoped(o);
    out[size_t(gate - 1)] = run(gpu, l, x, EcPath::Fused);
  }
  return out;
}

// A random W4 linear of the case's shape with a random compensator on it (seed: two values taken).
struct EcCase {
  int n, k, group, rank, gate;
};
struct CompensatedLinear {
  PackedQuantWeights p;
  Compensator c;
  std::unique_ptr<Linear> lin;
};
CompensatedLinear compensated_linear(cuda::CudaBackend& gpu, const EcCase& cs, uint32_t& seed) {
  CompensatedLinear l;
  l.p = w4test::random_quantized(cs.n, cs.k, 4, cs.group, seed++);
  l.c = w4test::random_compensator(cs.k, cs.n, cs.rank, cs.gate, seed++);
  l.lin = gpu.make_quant_linear("test", l.p, {});
  gpu.set_compensator(*l.lin, &l.c);
  return l;
}

// The fused path on the bulk-copy kernel under the current options for x [m][k] (hx): once first (the first fused
// launch of a shape is tuned, more launches), then twice counted; both must run on the bulk kernel, match the
// double-precision reference and the naive path within bf16, and be bit-identical. Returns the fused output.
std::vector<float> check_bulk_fused(cuda::CudaBackend& gpu, const CompensatedLinear& l, const std::vector<float>& hx,
                                    const Tensor& x, int m, const std::string& what) {
  const std::vector<float> ref = reference(l.p, &l.c, hx, m);
  const std::vector<float> naive = run(gpu, *l.lin, x, EcPath::Naive);
  run(gpu, *l.lin, x, EcPath::Fused);
  const uint64_t before = cuda::w4a16_bulk_ec_launches();
  const std::vector<float> fused = run(gpu, *l.lin, x, EcPath::Fused);
  const std::vector<float> fused2 = run(gpu, *l.lin, x, EcPath::Fused);
  EXPECT_EQ(cuda::w4a16_bulk_ec_launches(), before + 2) << what << ": not run on the bulk kernel";
  EXPECT_LT(rel_err(fused, ref), 1e-2) << what;
  EXPECT_LT(rel_err(fused, naive), 1e-2) << what;
  EXPECT_TRUE(fused == fused2) << what << ": two fused launches differ";
  return fused;
}

// Three W4 linears of widths ns over one k (a q/k/v-like group) with compensators on members 0 (rank 16, gate 8) and 2
// (rank2, static); weights seeded from wseed, compensators from cseed.
struct EcGroup {
  std::vector<PackedQuantWeights> ps;
  std::vector<std::unique_ptr<Linear>> ls;
  Compensator c0, c2;
  const Compensator* ec(int i) const { return i == 0 ? &c0 : i == 2 ? &c2 : nullptr; }
};
EcGroup ec_group(cuda::CudaBackend& gpu, int k, const int (&ns)[3], int group, int rank2, uint32_t wseed,
                 uint32_t cseed) {
  EcGroup g;
  for (int i = 0; i < 3; ++i) {
    g.ps.push_back(w4test::random_quantized(ns[i], k, 4, group, wseed + uint32_t(i)));
    g.ls.push_back(gpu.make_quant_linear("m" + std::to_string(i), g.ps.back(), {}));
  }
  g.c0 = w4test::random_compensator(k, ns[0], 16, 8, cseed);
  g.c2 = w4test::random_compensator(k, ns[2], rank2, 0, cseed + 1);
  gpu.set_compensator(*g.ls[0], &g.c0);
  gpu.set_compensator(*g.ls[2], &g.c2);
  return g;
}

std::string describe(const EcCase& cs, int m) {
  return "n " + std::to_string(cs.n) + " k " + std::to_string(cs.k) + " g " + std::to_string(cs.group) + " rank " +
         std::to_string(cs.rank) + " gate " + std::to_string(cs.gate) + " m " + std::to_string(m);
}

// Each member's output of a grouped launch against its own naive path and the double-precision reference.
void expect_members_match(cuda::CudaBackend& gpu, const EcGroup& eg, const Tensor& x, const std::vector<float>& hx,
                          int m, const Tensor (&ys)[3], const std::string& what) {
  for (int i = 0; i < 3; ++i) {
    std::vector<float> got(size_t(ys[i].numel()));
    gpu.download(ys[i], got.data());
    const std::vector<float> naive = run(gpu, *eg.ls[size_t(i)], x, EcPath::Naive);
    EXPECT_LT(rel_err(got, naive), 1e-2) << what << " member " << i;
    EXPECT_LT(rel_err(got, reference(eg.ps[size_t(i)], eg.ec(i), hx, m)), 1e-2) << what << " member " << i;
  }
}

}  // namespace

TEST(CudaEc, FusedAndOverlappedMatchNaiveAndReference) {
  SPEAR_REQUIRE_GPU();
  // Odd n (partial row tiles), k a multiple of 8 but not of 64, large k (many A·x slices), grouped weights,
  // rank 64 with gate 64 (the fused kernel's limits), static ECs, and rank 12 (not fusable: the fused path
  // falls back to naive).
  const EcCase cases[] = {{200, 136, -1, 8, 8},     {1000, 2048, -1, 16, 8}, {512, 8192, 128, 32, 0},
                          {2048, 2048, 64, 64, 64}, {77, 512, 32, 16, 0},    {384, 1024, -1, 12, 8}};
  uint32_t seed = 1;
  for (const EcCase& cs : cases) {
    cuda::CudaBackend gpu;
    gpu.set_ec_defer(false);  // the in-kernel EC on the bulk kernel (counted), also at 2+ tokens
    const CompensatedLinear l = compensated_linear(gpu, cs, seed);
    const PackedQuantWeights& p = l.p;
    const Compensator& c = l.c;
    const Linear* lin = l.lin.get();
    for (int m : {1, 3, 8, 17, 32, 100}) {
      const std::vector<float> hx = random_x(m, cs.k, seed++);
      Tensor x = gpu.upload(hx.data(), m, cs.k);
      const std::vector<float> ref = reference(p, &c, hx, m), ref_plain = reference(p, nullptr, hx, m);
      const std::vector<float> naive = run(gpu, *lin, x, EcPath::Naive);
      const std::vector<float> fused = run(gpu, *lin, x, EcPath::Fused);
      const std::vector<float> fused2 = run(gpu, *lin, x, EcPath::Fused);
      const std::vector<float> over = run(gpu, *lin, x, EcPath::Overlapped);
      const std::string what = describe(cs, m);
      // The slice sum and the gate in every W4 CTA, then once in the last EC CTA: the same plan, the same bits.
      const auto by_gate = run_fused_each_gate_place(gpu, *lin, x);
      EXPECT_LT(rel_err(by_gate[0], ref), 1e-2) << what << ": gate in the W4 CTAs";
      EXPECT_TRUE(by_gate[0] == by_gate[1]) << what << ": gate in the W4 CTAs vs in the last EC CTA";
      EXPECT_GT(rel_err(ref_plain, ref), 0.1) << what << ": the EC term is too small to test";
      EXPECT_LT(rel_err(naive, ref), 1e-2) << what;
      EXPECT_LT(rel_err(fused, ref), 1e-2) << what;
      EXPECT_LT(rel_err(over, ref), 1e-2) << what;
      EXPECT_LT(rel_err(fused, naive), 1e-2) << what;
      EXPECT_TRUE(fused == fused2) << what << ": two fused launches differ (counters not reset?)";
    }
  }
}

// The fused path on the bulk-copy decode kernel (forced: decode_rows = -1; sm_90, m <= 8, one wave): the same
// shapes as above, against naive and the double-precision reference; two launches bit-identical (the epochs);
// every launch here must have run on the bulk kernel.
TEST(CudaEc, BulkKernelFusedMatchesNaive) {
  SPEAR_REQUIRE_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  cuda::W4GemmOptions o = cuda::w4a16_get_options();
  o.decode_rows = -1;
  w4test::ScopedW4Options scoped(o);
  const EcCase cases[] = {{200, 136, -1, 8, 8},     {1000, 2048, -1, 16, 8}, {512, 8192, 128, 32, 0},
                          {2048, 2048, 64, 64, 64}, {77, 512, 32, 16, 0},    {64, 14336, 128, 16, 8}};
  uint32_t seed = 500;
  for (const EcCase& cs : cases) {
    cuda::CudaBackend gpu;
    gpu.set_ec_defer(false);  // the in-kernel EC on the bulk kernel (counted), also at 2+ tokens
    const CompensatedLinear l = compensated_linear(gpu, cs, seed);
    for (int m : {1, 3, 8}) {
      if (m == 8 && cs.k > 8192) continue;  // all of x for 8 tokens does not fit beside the ring
      const std::vector<float> hx = random_x(m, cs.k, seed++);
      Tensor x = gpu.upload(hx.data(), m, cs.k);
      const std::string what = describe(cs, m);
      const std::vector<float> fused = check_bulk_fused(gpu, l, hx, x, m, what);
      const auto by_gate = run_fused_each_gate_place(gpu, *l.lin, x);
      EXPECT_TRUE(by_gate[0] == by_gate[1]) << what << ": gate in the W4 CTAs vs in the last EC CTA";
      EXPECT_TRUE(by_gate[0] == fused) << what;
    }
  }
}

// The bulk-copy kernel with the ECs summed inside clusters of 8, 16 and 4 W4 CTAs (W4GemmOptions::ec_gate 3 / 4 / 5:
// no EC CTAs, DSMEM and a cluster barrier; w4a16_ec_cluster.cuh): many waves (8192 rows), a long k (14336), a k of 17
// k-blocks (the last CTAs' slices empty), rank 8 (zero rows padding the MMA tile), rank 64 with gate 64, static ECs;
// against naive and the double-precision reference, two launches bit-identical, every launch on the bulk kernel.
TEST(CudaEc, BulkKernelClusterEcMatchesNaive) {
  SPEAR_REQUIRE_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  const EcCase cases[] = {{2048, 2048, -1, 16, 8}, {8192, 2048, 128, 16, 8}, {256, 14336, 128, 16, 8},
                          {512, 1088, -1, 16, 0},  {256, 512, 32, 64, 64},   {512, 1024, -1, 8, 8}};
  uint32_t seed = 900;
  for (int gate : {3, 4, 5}) {
    cuda::W4GemmOptions o = cuda::w4a16_get_options();
    o.decode_rows = -1;
    o.ec_gate = gate;
    w4test::ScopedW4Options scoped(o);
    for (const EcCase& cs : cases) {
      cuda::CudaBackend gpu;
      gpu.set_ec_defer(false);  // the in-kernel EC on the bulk kernel (counted), also at 2+ tokens
      const CompensatedLinear l = compensated_linear(gpu, cs, seed);
      for (int m : {1, 3, 8}) {
        if (m == 8 && cs.k > 8192) continue;  // all of x for 8 tokens does not fit beside the ring
        if (gate == 5 && cs.k > 2048) continue;  // a quarter of A beside x and the ring: small k only
        const std::vector<float> hx = random_x(m, cs.k, seed++);
        Tensor x = gpu.upload(hx.data(), m, cs.k);
        const std::string what = describe(cs, m) + " cluster " + std::to_string(gate == 3 ? 8 : gate == 4 ? 16 : 4);
        check_bulk_fused(gpu, l, hx, x, m, what);
      }
    }
  }
}

// A grouped q/k/v-like launch with in-cluster ECs on two of three members (ranks 16 and 32, gated and static): each
// member equal to its naive path; the cluster boundaries are the members' boundaries.
TEST(CudaEc, GroupedClusterEcLaunchMatchesNaive) {
  SPEAR_REQUIRE_GPU();
  if (cuda::device_info(0).major < 9) GTEST_SKIP() << "the bulk-copy kernel needs sm_90";
  for (int gate : {3, 4, 5}) {
    cuda::W4GemmOptions o = cuda::w4a16_get_options();
    o.decode_rows = -1;
    o.ec_gate = gate;
    w4test::ScopedW4Options scoped(o);
    cuda::CudaBackend gpu;
    gpu.set_ec_defer(false);  // the in-kernel EC on the bulk kernel (counted), also at 2+ tokens
    const int k = 1024, ns[3] = {1024, 256, 256};
    const EcGroup eg = ec_group(gpu, k, ns, 128, 32, 150, 160);
    const auto& ls = eg.ls;
    for (int m : {1, 4, 8}) {
      const std::vector<float> hx = random_x(m, k, 170 + m);
      Tensor x = gpu.upload(hx.data(), m, k);
      const Linear* members[3] = {ls[0].get(), ls[1].get(), ls[2].get()};
      Tensor ys[3] = {gpu.alloc(m, ns[0]), gpu.alloc(m, ns[1]), gpu.alloc(m, ns[2])};
      Tensor* outs[3] = {&ys[0], &ys[1], &ys[2]};
      gpu.set_ec_path(EcPath::Fused);
      gpu.linear_group(x, members, outs);  // tunes the shape first where it is new
      const uint64_t before = cuda::w4a16_bulk_ec_launches();
      gpu.linear_group(x, members, outs);
      EXPECT_EQ(cuda::w4a16_bulk_ec_launches(), before + 1) << "gate " << gate << " m " << m << ": not bulk";
      expect_members_match(gpu, eg, x, hx, m, ys, "gate " + std::to_string(gate) + " m " + std::to_string(m));
    }
  }
}

// The projection-only launch of a row-parallel shard (w4a16_gemm_ec_project): y bit-identical to the plain GEMM
// under the same plan, z = A·x against a double-precision sum of the same bf16 values, the same bits on a second
// launch (ticket and epoch back in order), and a fused launch on the same scratch afterwards still equal to one
// before (the epoch advanced by exactly one per launch).
TEST(CudaEc, ProjectionOnlyLaunchGivesPlainOutputAndAx) {
  SPEAR_REQUIRE_GPU();
  struct Case {
    int n, k, group, m, rank;
  };
  const Case cases[] = {{256, 512, -1, 1, 16}, {4096, 7168, 128, 1, 16}, {4096, 2048, 128, 8, 32},
                        {200, 1032, -1, 3, 8}, {512, 4096, 64, 32, 64}};
  // {-1, 1}: the bulk-copy kernel (m <= 8; else the model's plan), whatever the number of waves.
  const std::pair<int, int> plans[] = {{0, 0}, {1, 1}, {2, 3}, {4, 1}, {8, 2}, {-1, 1}};
  int sms = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint32_t seed = 800;
  for (const Case& c : cases) {
    w4test::UploadedW4 mat(cuda::w4_prepare(w4test::random_quantized(c.n, c.k, 4, c.group, seed++)));
    w4test::DevEc ec(c.k, c.n, c.rank, 8, seed++);
    const std::vector<uint16_t> hx = w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f);
    w4test::W4DevBuf<uint16_t> x(hx), y_plain(size_t(c.m) * c.n), y_proj(size_t(c.m) * c.n),
        y_fused(size_t(c.m) * c.n), y_fused2(size_t(c.m) * c.n);
    w4test::W4DevBuf<float> z(size_t(c.m) * c.rank);
    // z in double from the bf16 A and x the kernel reads.
    const Compensator hc = w4test::random_compensator(c.k, c.n, c.rank, 8, seed - 2);
    std::vector<double> zref(size_t(c.m) * c.rank, 0.0);
    for (int t = 0; t < c.m; ++t)
      for (int j = 0; j < c.rank; ++j)
        for (int i = 0; i < c.k; ++i)
          zref[size_t(t) * c.rank + j] += double(bf16_to_f32(f32_to_bf16(hc.A[size_t(j) * c.k + i]))) *
                                          bf16_to_f32(hx[size_t(t) * c.k + i]);
    const cuda::W4EcDevice* ecs[1] = {&ec.dev};
    __nv_bfloat16* yf = w4test::bf_mut(y_fused);
    ASSERT_TRUE(cuda::w4a16_gemm_ec(w4test::bf(x), c.m, &mat.dev, 1, ecs, nullptr, &yf, sms, nullptr));
    for (auto plan : plans) {
      w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true});
      const std::string what = "n " + std::to_string(c.n) + " k " + std::to_string(c.k) + " m " +
                               std::to_string(c.m) + " rank " + std::to_string(c.rank) + " plan " +
                               std::to_string(plan.first) + "x" + std::to_string(plan.second);
      cuda::w4a16_gemm(w4test::bf(x), c.m, mat.dev, nullptr, w4test::bf_mut(y_plain), nullptr, 0, sms, nullptr);
      std::vector<float> z_first;
      const uint64_t bulk_before = cuda::w4a16_bulk_ec_launches();
      for (int rep = 0; rep < 2; ++rep) {
        ASSERT_TRUE(cuda::w4a16_gemm_ec_project(w4test::bf(x), c.m, mat.dev, ec.dev, nullptr,
                                                w4test::bf_mut(y_proj), z.get(), sms, nullptr))
            << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> got = z.download();
        if (rep == 0) {
          z_first = got;
          double num = 0, den = 0;
          for (size_t i = 0; i < got.size(); ++i)
            num += (got[i] - zref[i]) * (got[i] - zref[i]), den += zref[i] * zref[i];
          EXPECT_LT(std::sqrt(num / den), 1e-5) << what << ": z vs the double-precision A·x";
        } else {
          EXPECT_TRUE(got == z_first) << what << ": a second launch gave other bits";
        }
      }
      EXPECT_TRUE(y_proj.download() == y_plain.download()) << what << ": y is not the plain GEMM's";
      if (plan.first == -1 && c.m <= 8) {  // (4096 x 7168: 256 tiles and 28 EC CTAs, over one wave at 2 per SM)
        EXPECT_EQ(cuda::w4a16_bulk_ec_launches(), bulk_before + 2) << what << ": not run on the bulk kernel";
      }
    }
    __nv_bfloat16* yf2 = w4test::bf_mut(y_fused2);
    ASSERT_TRUE(cuda::w4a16_gemm_ec(w4test::bf(x), c.m, &mat.dev, 1, ecs, nullptr, &yf2, sms, nullptr));
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(y_fused2.download() == y_fused.download()) << "n " << c.n << " k " << c.k
                                                          << ": the fused launch after projections differs";
  }
}

// A grouped launch (q/k/v-like, shared x) with ECs on two of three members of different ranks: one fused
// launch, equal to the members one by one on the naive path.
TEST(CudaEc, GroupedFusedLaunchMatchesNaive) {
  SPEAR_REQUIRE_GPU();
  for (int group : {-1, 64}) {
    cuda::CudaBackend gpu;
    const int k = 512, ns[3] = {512, 128, 128};
    const EcGroup eg = ec_group(gpu, k, ns, group, 8, 50, 60);
    const auto& ls = eg.ls;
    for (int m : {1, 5, 32}) {
      const std::vector<float> hx = random_x(m, k, 70 + m);
      Tensor x = gpu.upload(hx.data(), m, k);
      const Linear* members[3] = {ls[0].get(), ls[1].get(), ls[2].get()};
      Tensor ys[3] = {gpu.alloc(m, ns[0]), gpu.alloc(m, ns[1]), gpu.alloc(m, ns[2])};
      Tensor* outs[3] = {&ys[0], &ys[1], &ys[2]};
      gpu.set_ec_path(EcPath::Fused);
      gpu.linear_group(x, members, outs);
      expect_members_match(gpu, eg, x, hx, m, ys, "group " + std::to_string(group) + " m " + std::to_string(m));
    }
  }
}

// The overlapped path at prefill sizes (m >= 129: dequantization + cuBLAS on the main stream; ec_overlap.h's gate
// and term kernels): ranks with B's rows in registers (8, 16, 32 on column pairs, 64 on single columns), a rank
// without (12), odd n (single columns), static and gated ECs, more tokens than one block of the term kernel takes.
TEST(CudaEc, OverlappedMatchesNaiveAndReferenceAtPrefill) {
  SPEAR_REQUIRE_GPU();
  struct Case {
    EcCase ec;
    int m;
  };
  const Case cases[] = {{{1000, 2048, -1, 16, 8}, 160}, {{77, 512, 32, 16, 0}, 600},  {{2048, 512, 64, 64, 64}, 300},
                        {{384, 1024, -1, 12, 8}, 600},  {{511, 256, -1, 8, 8}, 1000}, {{256, 384, -1, 32, 0}, 333}};
  uint32_t seed = 900;
  for (const Case& cs : cases) {
    cuda::CudaBackend gpu;
    const CompensatedLinear l = compensated_linear(gpu, cs.ec, seed);
    const std::vector<float> hx = random_x(cs.m, cs.ec.k, seed++);
    Tensor x = gpu.upload(hx.data(), cs.m, cs.ec.k);
    const std::vector<float> ref = reference(l.p, &l.c, hx, cs.m), ref_plain = reference(l.p, nullptr, hx, cs.m);
    const std::vector<float> naive = run(gpu, *l.lin, x, EcPath::Naive);
    const std::vector<float> over = run(gpu, *l.lin, x, EcPath::Overlapped);
    const std::vector<float> over2 = run(gpu, *l.lin, x, EcPath::Overlapped);
    const std::string what = describe(cs.ec, cs.m);
    EXPECT_GT(rel_err(ref_plain, ref), 0.1) << what << ": the EC term is too small to test";
    EXPECT_LT(rel_err(naive, ref), 1e-2) << what;
    EXPECT_LT(rel_err(over, ref), 1e-2) << what;
    EXPECT_LT(rel_err(over, naive), 1e-2) << what;
    EXPECT_TRUE(over == over2) << what << ": two overlapped runs differ";
  }
}

// time_ec_paths (what `spear tune` builds the dispatch table from): every path it can run, positive times;
// fused only where the decode kernel takes the launch.
TEST(CudaEc, TimeEcPathsReportsEachRunnablePath) {
  SPEAR_REQUIRE_GPU();
  cuda::CudaBackend gpu;
  const PackedQuantWeights p = w4test::random_quantized(1024, 1024, 4, -1, 5);
  const Compensator c = w4test::random_compensator(1024, 1024, 16, 8, 6);
  auto lin = gpu.make_quant_linear("test", p, {});
  gpu.set_compensator(*lin, &c);
  const int tokens[] = {1, 16, 64};
  const Linear* ls[] = {lin.get()};
  const auto t = gpu.time_ec_paths(ls, tokens, 3);
  ASSERT_EQ(t.size(), 3u);
  for (const auto& e : t) {
    EXPECT_EQ(e.us.count(EcPath::Naive), 1u) << e.m;
    EXPECT_EQ(e.us.count(EcPath::Overlapped), 1u) << e.m;
    EXPECT_EQ(e.us.count(EcPath::Fused), e.m <= 32 ? 1u : 0u) << e.m;
    for (const auto& [path, us] : e.us) EXPECT_GT(us, 0.0) << e.m << " " << ec_path_name(path);
    EXPECT_GT(e.base_us, 0.0) << e.m;
  }
}

}  // namespace spear
