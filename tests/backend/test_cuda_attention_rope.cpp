// Decode attention with RoPE and the KV append fused in (attention_decode_rope_bf16) against the kernels it
// replaces, rope_kv_append_bf16 then attention_bf16 (decode), bit for bit: the output, and the whole K/V pools
// afterwards. The pools start full of random rows (also at the new tokens' positions, which the fused kernel must
// not read); pages are handed out in reverse order; cases cover one and several context splits, two head blocks
// (group 20), a padded head dim (96), an odd half head dim (4-byte K/V loads), a sliding window, and a new token
// whose page is not allocated (nothing written, as rope_kv_append_bf16).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rope_kv_append.h"
#include "w4a16_test_util.h"

namespace spear {

namespace {

template <typename T>
using Dev = w4test::W4DevBuf<T>;

struct RopeAttnCase {
  int n_heads, n_kv_heads, head_dim, window;
  std::vector<int> pos;  // the new token's position, one sequence each
  bool workspace;        // with a split workspace (several splits) or without (one CTA per context)
  int hole = -1;         // this sequence's new-token page is left unallocated
};

std::string describe(const RopeAttnCase& c) {
  std::string s = std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) + " heads x " +
                  std::to_string(c.head_dim) + ", window " + std::to_string(c.window) + ", pos";
  for (int p : c.pos) s += " " + std::to_string(p);
  return s + (c.workspace ? ", split" : ", unsplit") + (c.hole >= 0 ? ", hole" : "");
}

}  // namespace

TEST(CudaAttentionRope, EqualsRopeAppendThenAttention) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 77;
  const RopeAttnCase cases[] = {
      {32, 8, 64, 0, {0, 15, 16, 300, 1000}, true},   // Llama-3.2-1B heads
      {32, 8, 64, 0, {0, 15, 16, 300, 1000}, false},
      {24, 8, 128, 0, {5, 2047, 64}, true},            // Llama-3.2-3B heads
      {40, 2, 96, 0, {130, 7}, true},                  // two head blocks, head dim padded to 128
      {6, 2, 10, 0, {3, 77}, true},                    // odd half head dim: 4-byte K/V loads
      {8, 4, 64, 100, {500, 20}, true},                // sliding window
      {8, 2, 64, 0, {40, 64, 900}, true, 1},           // sequence 1's new page unallocated
  };
  for (const RopeAttnCase& c : cases) {
    SCOPED_TRACE(describe(c));
    const int T = int(c.pos.size()), D = c.head_dim;
    const int kv_dim = c.n_kv_heads * D, q_dim = c.n_heads * D;
    int max_len = 0;
    for (int p : c.pos) max_len = std::max(max_len, p + 1);
    const int max_blocks = (max_len + cuda::kBlockTokens - 1) / cuda::kBlockTokens;
    // Sequence i in slot i + 1 with all of its pages up to the new token's; then the page order is reversed.
    const int n_slots = T + 1;
    std::vector<int32_t> table(size_t(n_slots) * max_blocks, -1), token_seq, positions;
    std::vector<cuda::DevSeq> seqs;
    int next = 0;
    for (int i = 0; i < T; ++i) {
      seqs.push_back({i, 1, c.pos[size_t(i)], i + 1});
      token_seq.push_back(i);
      positions.push_back(c.pos[size_t(i)]);
      for (int b = 0; b <= c.pos[size_t(i)] / cuda::kBlockTokens; ++b)
        if (!(i == c.hole && b == c.pos[size_t(i)] / cuda::kBlockTokens))
          table[size_t(i + 1) * max_blocks + b] = next++;
    }
    for (auto& b : table)
      if (b >= 0) b = next - 1 - b;
    std::vector<float> inv_freq(size_t(D / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(500000.f, -2.f * float(i) / float(D));

    const auto q = w4test::random_bf16(size_t(T) * q_dim, seed++, 2.f),
               k = w4test::random_bf16(size_t(T) * kv_dim, seed++), v = w4test::random_bf16(size_t(T) * kv_dim, seed++);
    const size_t pool_n = size_t(next) * cuda::kBlockTokens * kv_dim;
    const auto pool_k = w4test::random_bf16(pool_n, seed++), pool_v = w4test::random_bf16(pool_n, seed++);
    Dev<int32_t> dtab(table), dtok(token_seq), dpos(positions);
    Dev<cuda::DevSeq> dseqs(seqs);
    Dev<float> dfreq(inv_freq);
    Dev<uint16_t> qa(q), ka(k), va(v), qb(q), kb(k), vb(v), pka(pool_k), pva(pool_v), pkb(pool_k), pvb(pool_v);
    Dev<uint16_t> outa(std::vector<uint16_t>(size_t(T) * q_dim, 0xffff)),
        outb(std::vector<uint16_t>(size_t(T) * q_dim, 0xffff));
    auto layer = [&](const Dev<uint16_t>& pk, const Dev<uint16_t>& pv) {
      cuda::PagedKvLayer l;
      l.k = w4test::bf_mut(pk);
      l.v = w4test::bf_mut(pv);
      l.block_table = dtab.get();
      l.max_blocks = max_blocks;
      l.kv_dim = kv_dim;
      return l;
    };
    cuda::AttnShape shape;
    shape.n_heads = c.n_heads;
    shape.n_kv_heads = c.n_kv_heads;
    shape.head_dim = D;
    shape.window = c.window;
    shape.scale = 1.f / std::sqrt(float(D));
    const size_t ws_bytes = c.workspace ? cuda::attention_workspace_bytes(T, c.n_heads, D, max_blocks) : 0;
    Dev<uint8_t> wsa(std::vector<uint8_t>(std::max<size_t>(ws_bytes, 1), 0)),
        wsb(std::vector<uint8_t>(std::max<size_t>(ws_bytes, 1), 0));

    cuda::rope_kv_append_bf16(w4test::bf_mut(qa), w4test::bf_mut(ka), w4test::bf(va), T, c.n_heads, D, dpos.get(),
                              dfreq.get(), dtok.get(), dseqs.get(), layer(pka, pva), nullptr);
    cuda::attention_bf16(w4test::bf(qa), T, dtok.get(), dseqs.get(), T, layer(pka, pva), shape, max_len, true,
                         w4test::bf_mut(outa), c.workspace ? wsa.get() : nullptr, ws_bytes, nullptr);
    for (int rep = 0; rep < 2; ++rep)  // twice: the split counters must be back at zero, the result the same
      cuda::attention_decode_rope_bf16(w4test::bf(qb), w4test::bf(kb), w4test::bf(vb), T, dpos.get(), dfreq.get(),
                                       dtok.get(), dseqs.get(), T, layer(pkb, pvb), shape, w4test::bf_mut(outb),
                                       c.workspace ? wsb.get() : nullptr, ws_bytes, nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> oa = outa.download(), ob = outb.download();
    EXPECT_TRUE(oa == ob) << "attention outputs differ";
    EXPECT_TRUE(std::none_of(ob.begin(), ob.end(), [](uint16_t b) { return b == 0xffff; })) << "output not written";
    EXPECT_TRUE(pka.download() == pkb.download()) << "cached k differs";
    EXPECT_TRUE(pva.download() == pvb.download()) << "cached v differs";
    EXPECT_FALSE(pkb.download() == pool_k) << "nothing appended";
    EXPECT_TRUE(qb.download() == q && kb.download() == k) << "the fused kernel changed q or k";
    if (c.workspace) {
      const std::vector<uint8_t> w = wsb.download();
      EXPECT_TRUE(std::all_of(w.begin(), w.begin() + cuda::attention_workspace_zero_bytes(),
                              [](uint8_t x) { return x == 0; }))
          << "split counters left non-zero";
    }
  }
}

}  // namespace spear
