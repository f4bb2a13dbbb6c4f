// Deferred compensators (w4a16_gemm_ec_deferred, ec_term.h): the launch leaves y exactly as the plain W4 GEMM under
// the same plan and g ⊙ z for the next reader, and y plus that term equals the fused EC launch up to its rounding
// (one bf16 rounding there, two here), under every kind of plan, one matrix and grouped, repeated launches on the same
// scratch. Then the decoder's use of it: logits and greedy tokens of decode steps with the terms deferred to rope_qk,
// add_rms_norm and swiglu equal the undeferred run's, and no term is left to the fallback.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_term.h"
#include "backend/cuda/w4a16_gemm.h"
#include "model/model.h"
#include "quant/quantize_model.h"
#include "spear/random_ec.h"
#include "test_util.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

using w4test::bf_mut;
template <typename T>
using Dev = w4test::W4DevBuf<T>;

int sm_count() {
  int sms = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return sms;
}

const std::pair<int, int> kPlans[] = {{0, 0}, {1, 1}, {2, 3}, {4, 1}, {8, 2}, {-1, 1}};

double max_rel(const std::vector<uint16_t>& got, const std::vector<uint16_t>& ref) {
  double worst = 0, scale = 0;
  for (uint16_t v : ref) scale = std::max(scale, double(std::fabs(bf16_to_f32(v))));
  for (size_t i = 0; i < ref.size(); ++i)
    worst = std::max(worst, std::fabs(double(bf16_to_f32(got[i])) - bf16_to_f32(ref[i])) / scale);
  return worst;
}

}  // namespace

TEST(CudaEcDeferred, LaunchLeavesPlainOutputAndTheTerm) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    std::vector<int> n;
    int k, group, m;
    std::vector<int> rank;  // 0: no compensator on that matrix
  };
  const Case cases[] = {{{512}, 2048, 128, 1, {16}},
                        {{2048}, 8192, 128, 8, {32}},
                        {{200}, 1032, -1, 3, {8}},
                        {{2048, 512, 512}, 2048, 128, 1, {16, 0, 8}},
                        {{1000, 1000}, 4096, -1, 5, {24, 16}},
                        {{4096}, 4096, 128, 32, {64}}};
  uint32_t seed = 1700;
  const int sms = sm_count();
  for (const Case& c : cases) {
    const int count = int(c.n.size());
    std::vector<std::unique_ptr<w4test::UploadedW4>> mats;
    std::vector<std::unique_ptr<w4test::DevEc>> ecs;
    cuda::W4Device w[4];
    const cuda::W4EcDevice* ec[4] = {};
    for (int i = 0; i < count; ++i) {
      mats.push_back(std::make_unique<w4test::UploadedW4>(
          cuda::w4_prepare(w4test::random_quantized(c.n[size_t(i)], c.k, 4, c.group, seed++))));
      w[i] = mats.back()->dev;
      if (c.rank[size_t(i)]) {
        ecs.push_back(std::make_unique<w4test::DevEc>(c.k, c.n[size_t(i)], c.rank[size_t(i)], 8, seed++));
        ec[i] = &ecs.back()->dev;
      }
    }
    Dev<uint16_t> x(w4test::random_bf16(size_t(c.m) * c.k, seed++, 1.f));
    for (auto plan : kPlans) {
      w4test::ScopedW4Options scoped({true, 0, plan.first, plan.second, true});
      std::string what = "n";
      for (int n : c.n) what += " " + std::to_string(n);
      what += ", k " + std::to_string(c.k) + " m " + std::to_string(c.m) + " plan " + std::to_string(plan.first) +
              "x" + std::to_string(plan.second);
      std::vector<std::unique_ptr<Dev<uint16_t>>> plain, fused, def;
      __nv_bfloat16 *yp[4], *yf[4], *yd[4];
      for (int i = 0; i < count; ++i) {
        const size_t ny = size_t(c.m) * c.n[size_t(i)];
        plain.push_back(std::make_unique<Dev<uint16_t>>(ny));
        fused.push_back(std::make_unique<Dev<uint16_t>>(ny));
        def.push_back(std::make_unique<Dev<uint16_t>>(std::vector<uint16_t>(ny, 0xffff)));
        yp[i] = bf_mut(*plain.back()), yf[i] = bf_mut(*fused.back()), yd[i] = bf_mut(*def.back());
      }
      if (count == 1)
        cuda::w4a16_gemm(bf_mut(x), c.m, w[0], nullptr, yp[0], nullptr, 0, sms, nullptr);
      else
        cuda::w4a16_gemm_grouped(bf_mut(x), c.m, w, count, nullptr, yp, nullptr, 0, sms, nullptr);
      ASSERT_TRUE(cuda::w4a16_gemm_ec(bf_mut(x), c.m, w, count, ec, nullptr, yf, sms, nullptr)) << what;
      std::vector<std::vector<float>> gz_first(static_cast<size_t>(count));
      for (int rep = 0; rep < 2; ++rep) {  // the second launch on the same scratch: same bits
        ASSERT_TRUE(cuda::w4a16_gemm_ec_deferred(bf_mut(x), c.m, w, count, ec, nullptr, yd, sms, nullptr)) << what;
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        for (int i = 0; i < count; ++i) {
          if (!ec[i]) continue;
          std::vector<float> gz(size_t(c.m) * ec[i]->rank);
          SPEAR_CUDA_CHECK(cudaMemcpy(gz.data(), cuda::w4a16_ec_gz(*ec[i]), gz.size() * 4, cudaMemcpyDeviceToHost));
          if (rep == 0) {
            gz_first[size_t(i)] = gz;
          } else {
            EXPECT_TRUE(gz == gz_first[size_t(i)]) << what << ": matrix " << i << ": g ⊙ z changed on a rerun";
          }
        }
      }
      for (int i = 0; i < count; ++i) {
        const std::string wi = what + ", matrix " + std::to_string(i);
        EXPECT_TRUE(def[size_t(i)]->download() == plain[size_t(i)]->download()) << wi << ": y is not the plain GEMM's";
        if (!ec[i]) continue;
        cuda::EcTerm t;
        t.B = ec[i]->B;
        t.gz = cuda::w4a16_ec_gz(*ec[i]);
        t.rank = ec[i]->rank;
        cuda::ec_apply_bf16(yd[i], c.m, c.n[size_t(i)], t, nullptr);
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        const double err = max_rel(def[size_t(i)]->download(), fused[size_t(i)]->download());
        EXPECT_LT(err, 1.6e-2) << wi << ": y + term vs the fused launch (max error / max |y|)";
        EXPECT_FALSE(def[size_t(i)]->download() == plain[size_t(i)]->download()) << wi << ": the term did nothing";
      }
    }
  }
}

// The decoder with deferral (SPEAR_EC_DEFER 1: q/k/v, o, down deferred, gate / up inside the fused SwiGLU launch at one
// token; 2: gate / up deferred too) against the run without (0): the same greedy tokens from replayed decode graphs,
// logits within the bf16 rounding of one extra step, every deferred term added by its consumer.
TEST(CudaEcDeferred, DecodeStepsMatchUndeferred) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::string pkg = [] {
    std::string d = test::scratch_dir("cuda_ec_deferred_pkg");
    std::filesystem::remove_all(d);
    quantize_model(test::ref_model_dir(), d, QuantizeOptions{});
    return d;
  }();
  struct Result {
    std::vector<float> logits;
    std::vector<int32_t> greedy;
    size_t deferred = 0, settled = 0;
  };
  auto run = [&](int mode, int seqs) {
    cuda::CudaBackend gpu;
    gpu.set_ec_defer_mode(mode);
    auto m = Model::load(pkg, gpu);
    gpu.set_ec_path(EcPath::Fused);
    attach_random_compensators(*m, 0.6, 16, 8, 99);
    Result r;
    auto cache = m->make_kv_cache(seqs, 64);
    Batch b;
    for (int s = 0; s < seqs; ++s) {
      b.seqs.push_back({int(b.tokens.size()), 3, 0, s});
      for (int j = 0; j < 3; ++j) b.tokens.push_back(int32_t(100 + 37 * s + 11 * j));
    }
    std::vector<int32_t> next = m->forward_greedy(b, *cache);
    for (int step = 0; step < 8; ++step) {
      Batch d;
      for (int s = 0; s < seqs; ++s) {
        r.greedy.push_back(next[size_t(s)]);
        d.seqs.push_back({s, 1, 3 + step, s});
        d.tokens.push_back(next[size_t(s)]);
      }
      if (step == 7) {
        r.logits = m->forward(d, *cache, LogitsMode::LastPerSeq);
      } else {
        next = m->forward_greedy(d, *cache);
      }
    }
    r.deferred = gpu.deferred_ec_launches();
    r.settled = gpu.settled_ec_terms();
    return r;
  };
  for (int seqs : {1, 3}) {
    const Result ref = run(0, seqs);
    EXPECT_EQ(ref.deferred, 0u);
    for (int mode : {1, 2}) {
      const std::string what = std::to_string(seqs) + " sequences, mode " + std::to_string(mode);
      const Result got = run(mode, seqs);
      EXPECT_GT(got.deferred, 0u) << what << ": nothing ran deferred";
      EXPECT_EQ(got.settled, 0u) << what << ": terms left to the fallback";
      EXPECT_EQ(got.greedy, ref.greedy) << what;
      ASSERT_EQ(got.logits.size(), ref.logits.size());
      double num = 0, den = 0;
      for (size_t i = 0; i < ref.logits.size(); ++i) {
        num += double(got.logits[i] - ref.logits[i]) * (got.logits[i] - ref.logits[i]);
        den += double(ref.logits[i]) * ref.logits[i];
      }
      EXPECT_LT(std::sqrt(num / den), 1e-2) << what << ": logits rel l2";
    }
  }
}

}  // namespace spear
