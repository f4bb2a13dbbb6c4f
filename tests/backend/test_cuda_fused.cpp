// The fused decoder kernels against the kernels they replace, bit for bit: add_rms_norm_bf16 = add_bf16 then
// rms_norm_bf16; rope_kv_append_bf16 = rope_bf16 on q and on k then kv_append_bf16 (odd sizes, several
// sequences on scattered pages, positions past 2^16); and the fused decode MLP block against its ops (up to the
// GEMMs' summation order).
#include <algorithm>
#include <cmath>
#include <string>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/mlp_fused.h"
#include "backend/cuda/w4a16_gemm.h"
#include "backend/cuda/rms_norm.h"
#include "backend/cuda/rope_kv_append.h"
#include "core/dtype.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

// A device copy of a host vector (the W4 tests' buffer).
template <typename T>
using Dev = w4test::W4DevBuf<T>;

std::vector<uint16_t> random_bits(size_t n, std::mt19937& rng, float sd) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f32_to_bf16(nd(rng));
  return v;
}

}  // namespace

TEST(CudaFused, AddRmsNormEqualsAddThenNorm) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(41);
  for (auto [rows, d] : {std::pair{1, 64}, {3, 777}, {8, 2048}, {33, 4096}}) {
    const auto x = random_bits(size_t(rows) * d, rng, 3.f), y = random_bits(size_t(rows) * d, rng, 1.f);
    const auto w = random_bits(size_t(d), rng, 0.5f);
    Dev<uint16_t> xa(x), ya(y), xb(x), yb(y), dw(w), outa(std::vector<uint16_t>(x.size(), 0xffff)),
        outb(std::vector<uint16_t>(x.size(), 0xffff));
    cuda::add_bf16(bf_mut(xa), bf_mut(ya), int64_t(x.size()), nullptr);
    cuda::rms_norm_bf16(bf_mut(xa), bf_mut(dw), bf_mut(outa), rows, d, 1e-5f, nullptr);
    cuda::add_rms_norm_bf16(bf_mut(xb), bf_mut(yb), bf_mut(dw), bf_mut(outb), rows, d, 1e-5f, nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(xa.download() == xb.download()) << rows << "x" << d << ": residual sums differ";
    EXPECT_TRUE(outa.download() == outb.download()) << rows << "x" << d << ": normed outputs differ";
  }
}

TEST(CudaFused, RopeKvAppendEqualsRopeThenAppend) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(42);
  struct Case {
    int n_heads, n_kv_heads, head_dim;
    std::vector<std::pair<int, int>> seqs;  // (pos0, n_tokens)
  };
  const Case cases[] = {{32, 8, 64, {{0, 1}, {70000, 1}, {17, 1}}},  // decode, three sequences
                        {6, 2, 10, {{5, 9}, {0, 23}}},                // prefill, odd head_dim / 2
                        {4, 4, 128, {{31, 2}}}};
  for (const Case& c : cases) {
    const int kv_dim = c.n_kv_heads * c.head_dim, q_dim = c.n_heads * c.head_dim;
    // Sequence i in slot i + 1; pages handed out in reverse order so that they are not contiguous.
    int max_len = 0, T = 0;
    for (auto [p0, n] : c.seqs) max_len = std::max(max_len, p0 + n), T += n;
    const int max_blocks = (max_len + cuda::kBlockTokens - 1) / cuda::kBlockTokens;
    const int n_slots = int(c.seqs.size()) + 1;
    std::vector<int32_t> table(size_t(n_slots) * max_blocks, -1);
    int next = 0;
    std::vector<int32_t> token_seq, positions;
    std::vector<cuda::DevSeq> seqs;
    for (int i = 0, tb = 0; i < int(c.seqs.size()); ++i) {
      auto [p0, n] = c.seqs[size_t(i)];
      seqs.push_back({tb, n, p0, i + 1});
      for (int j = 0; j < n; ++j) token_seq.push_back(i), positions.push_back(p0 + j);
      for (int b = p0 / cuda::kBlockTokens; b <= (p0 + n - 1) / cuda::kBlockTokens; ++b)
        table[size_t(i + 1) * max_blocks + b] = next++;
      tb += n;
    }
    const int n_blocks = next;
    std::vector<int32_t> rev(table);  // reverse the page order
    for (auto& b : rev)
      if (b >= 0) b = n_blocks - 1 - b;
    std::vector<float> inv_freq(size_t(c.head_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(500000.f, -2.f * float(i) / float(c.head_dim));

    const auto q = random_bits(size_t(T) * q_dim, rng, 1.f), k = random_bits(size_t(T) * kv_dim, rng, 1.f),
               v = random_bits(size_t(T) * kv_dim, rng, 1.f);
    const std::vector<uint16_t> pool(size_t(n_blocks) * cuda::kBlockTokens * kv_dim, 0);
    Dev<int32_t> dtab(rev), dtok(token_seq), dpos(positions);
    Dev<cuda::DevSeq> dseqs(seqs);
    Dev<float> dfreq(inv_freq);
    Dev<uint16_t> qa(q), ka(k), va(v), qb(q), kb(k), vb(v), pka(pool), pva(pool), pkb(pool), pvb(pool);
    auto layer = [&](const Dev<uint16_t>& pk, const Dev<uint16_t>& pv) {
      cuda::PagedKvLayer l;
      l.k = bf_mut(pk);
      l.v = bf_mut(pv);
      l.block_table = dtab.get();
      l.max_blocks = max_blocks;
      l.kv_dim = kv_dim;
      return l;
    };
    cuda::rope_bf16(bf_mut(qa), T, c.n_heads, c.head_dim, dpos.get(), dfreq.get(), nullptr);
    cuda::rope_bf16(bf_mut(ka), T, c.n_kv_heads, c.head_dim, dpos.get(), dfreq.get(), nullptr);
    cuda::kv_append_bf16(bf_mut(ka), bf_mut(va), T, dtok.get(), dseqs.get(), layer(pka, pva), nullptr);
    cuda::rope_kv_append_bf16(bf_mut(qb), bf_mut(kb), bf_mut(vb), T, c.n_heads, c.head_dim, dpos.get(), dfreq.get(), dtok.get(),
                              dseqs.get(), layer(pkb, pvb), nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    const std::string what = "heads " + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) + " x " +
                             std::to_string(c.head_dim) + ", T " + std::to_string(T);
    EXPECT_TRUE(qa.download() == qb.download()) << what << ": q differs";
    EXPECT_TRUE(ka.download() == kb.download()) << what << ": k differs";
    EXPECT_TRUE(pka.download() == pkb.download()) << what << ": cached k differs";
    EXPECT_TRUE(pva.download() == pvb.download()) << what << ": cached v differs";
    EXPECT_FALSE(pka.download() == pool) << what << ": nothing appended";
  }
}

}  // namespace spear

namespace spear {

// The fused decode MLP block (mlp_fused.h) against the ops it replaces: add_rms_norm, the W4 gate and up GEMMs,
// SwiGLU, the W4 down GEMM and the residual add. Only the GEMMs' fp32 summation order differs, so a few bf16
// roundings may land one ulp apart; the block runs three times from the same inputs (its counters must be back
// at zero after each launch).
TEST(CudaFused, MlpBlockEqualsOpByOp) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    int hidden, inter, group, m;
  };
  const Case cases[] = {{64, 128, -1, 1}, {96, 208, 16, 5}, {256, 704, 64, 3}, {2048, 8192, 128, 1},
                        {2048, 8192, 128, 8}, {4096, 14336, 128, 2}, {2048, 8192, -1, 4}};
  uint32_t seed = 900;
  int sms = 0;
  SPEAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (const Case& c : cases) {
    const cuda::W4Layout lg = cuda::w4_prepare(w4test::random_quantized(c.inter, c.hidden, 4, c.group, seed++));
    const cuda::W4Layout lu = cuda::w4_prepare(w4test::random_quantized(c.inter, c.hidden, 4, c.group, seed++));
    const cuda::W4Layout ld = cuda::w4_prepare(w4test::random_quantized(c.hidden, c.inter, 4, c.group, seed++));
    w4test::UploadedW4 g(lg), u(lu), d(ld);
    const std::string what = "hidden " + std::to_string(c.hidden) + " inter " + std::to_string(c.inter) + " group " +
                             std::to_string(c.group) + " m " + std::to_string(c.m);
    if (!cuda::fused_mlp_supported(c.m, g.dev, u.dev, d.dev)) {
      ADD_FAILURE() << what << ": not supported";
      continue;
    }
    const size_t nx = size_t(c.m) * c.hidden, na = size_t(c.m) * c.inter;
    const auto x0 = w4test::random_bf16(nx, seed++, 1.f), add = w4test::random_bf16(nx, seed++, 1.f);
    const auto nw = w4test::random_bf16(size_t(c.hidden), seed++, 0.3f);
    Dev<uint16_t> dadd(add), dnw(nw);
    // Op by op.
    Dev<uint16_t> xr(x0), h(nx), gate(na), up(na), act(na), mlp(nx);
    cuda::add_rms_norm_bf16(bf_mut(xr), bf_mut(dadd), bf_mut(dnw), bf_mut(h), c.m, c.hidden, 1e-5f, nullptr);
    cuda::w4a16_gemm(bf_mut(h), c.m, g.dev, nullptr, bf_mut(gate), nullptr, 0, sms, nullptr);
    cuda::w4a16_gemm(bf_mut(h), c.m, u.dev, nullptr, bf_mut(up), nullptr, 0, sms, nullptr);
    cuda::swiglu_bf16(bf_mut(gate), bf_mut(up), bf_mut(act), int64_t(na), nullptr);
    cuda::w4a16_gemm(bf_mut(act), c.m, d.dev, nullptr, bf_mut(mlp), nullptr, 0, sms, nullptr);
    cuda::add_bf16(bf_mut(xr), bf_mut(mlp), int64_t(nx), nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> ref_bits = xr.download();
    const std::vector<float> ref = w4test::to_f32(ref_bits);
    // Fused, three times.
    Dev<unsigned> counters(std::vector<unsigned>(cuda::kFusedMlpCounterBytes / 4, 0u));
    Dev<uint16_t> scratch(std::vector<uint16_t>(na, 0xffff));
    std::vector<uint16_t> first;
    for (int rep = 0; rep < 3; ++rep) {
      Dev<uint16_t> xf(x0);
      cuda::FusedMlpArgs a;
      a.x = bf_mut(xf);
      a.add = bf_mut(dadd);
      a.norm_w = bf_mut(dnw);
      a.eps = 1e-5f;
      a.gate = g.dev;
      a.up = u.dev;
      a.down = d.dev;
      a.act = bf_mut(scratch);
      a.counters = counters.get();
      a.m = c.m;
      a.sm_count = sms;
      cuda::fused_mlp_decode(a, nullptr);
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<uint16_t> got = xf.download();
      if (rep == 0) {
        first = got;
        const std::vector<float> gf = w4test::to_f32(got);
        size_t same = 0;
        for (size_t i = 0; i < nx; ++i) same += got[i] == ref_bits[i];
        const double err = w4test::rel_err(gf, ref);
        std::printf("%s: rel err %.2e, %zu / %zu bit-identical\n", what.c_str(), err, same, nx);
        EXPECT_LT(err, 3e-3) << what;
        EXPECT_GT(double(same), 0.8 * double(nx)) << what;
      } else {
        EXPECT_TRUE(got == first) << what << ": launch " << rep << " differs from the first";
      }
      const std::vector<unsigned> cnt = counters.download();
      EXPECT_EQ(cnt[0] + cnt[1] + cnt[2], 0u) << what << ": counters not back at zero";
    }
  }
}

}  // namespace spear
