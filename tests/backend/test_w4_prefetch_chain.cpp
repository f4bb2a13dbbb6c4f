// The L2 prefetch chain of the decode W4 launches (backend/cuda/w4_prefetch_chain.h): host logic only, runs
// without a GPU.
#include <gtest/gtest.h>

#include <cstdint>

#include "backend/cuda/w4_prefetch_chain.h"

using spear::cuda::kW4MaxPrefetch;
using spear::cuda::W4Device;
using spear::cuda::W4Prefetch;
using spear::cuda::W4PrefetchChain;

namespace {

// A fake matrix [n, k] per channel whose regions start at distinct fake addresses (never dereferenced).
W4Device mat(uintptr_t base, int n, int k) {
  W4Device d;
  d.n = d.n_pad = n;
  d.k = d.k_pad = k;
  d.q = reinterpret_cast<const uint32_t*>(base);
  d.scales = reinterpret_cast<const float*>(base + 0x100000);
  d.zeros = reinterpret_cast<const uint16_t*>(base + 0x200000);
  return d;
}

uint64_t total(const W4Prefetch& pf) {
  uint64_t s = 0;
  for (int i = 0; i < pf.count; ++i) s += pf.bytes[i];
  return s;
}

}  // namespace

TEST(W4PrefetchChain, LearnsTheOrderAndPrefetchesTheNextTwoLaunches) {
  const W4Device a = mat(0x10000000, 64, 128), b = mat(0x20000000, 32, 256), c = mat(0x30000000, 16, 64);
  W4PrefetchChain chain(size_t(1) << 30);
  // First step: nothing is known yet.
  EXPECT_EQ(chain.prefetch(&a, 1), nullptr);
  EXPECT_EQ(chain.prefetch(&b, 1), nullptr);
  EXPECT_EQ(chain.prefetch(&c, 1), nullptr);
  // Second step: a -> b, c; b -> c, a; c -> a, b (the chain wraps into the next step).
  const W4Prefetch* pa = chain.prefetch(&a, 1);
  ASSERT_NE(pa, nullptr);
  ASSERT_EQ(pa->count, 6);  // codes, scales, zeros of b, then of c
  EXPECT_EQ(pa->ptr[0], b.q);
  EXPECT_EQ(pa->bytes[0], 32u * 256 / 2);
  EXPECT_EQ(pa->ptr[1], b.scales);
  EXPECT_EQ(pa->bytes[1], 32u * 4);
  EXPECT_EQ(pa->ptr[2], b.zeros);
  EXPECT_EQ(pa->bytes[2], 32u * 2);
  EXPECT_EQ(pa->ptr[3], c.q);
  EXPECT_EQ(pa->bytes[3], 16u * 64 / 2);
  const W4Prefetch* pc = chain.prefetch(&b, 1);
  ASSERT_NE(pc, nullptr);
  EXPECT_EQ(pc->ptr[0], c.q);
  EXPECT_EQ(pc->ptr[3], a.q);
  // A new order replaces the old link: a -> c now.
  chain.prefetch(&c, 1);
  chain.prefetch(&a, 1);
  chain.prefetch(&c, 1);
  pa = chain.prefetch(&a, 1);
  ASSERT_NE(pa, nullptr);
  EXPECT_EQ(pa->ptr[0], c.q);
}

TEST(W4PrefetchChain, StopsAtTheBudgetAndAtTheRegionLimit) {
  const W4Device a = mat(0x10000000, 64, 128);
  W4Device group[4] = {mat(0x20000000, 1024, 1024), mat(0x30000000, 1024, 1024), mat(0x40000000, 1024, 1024),
                       mat(0x50000000, 1024, 1024)};
  W4PrefetchChain chain(1000000);  // less than the group's codes (4 x 512 KB)
  chain.prefetch(&a, 1);
  chain.prefetch(group, 4);
  const W4Prefetch* pa = chain.prefetch(&a, 1);
  ASSERT_NE(pa, nullptr);
  EXPECT_LE(total(*pa), 1000000u);
  EXPECT_GE(total(*pa), 1000000u - 16);
  for (int i = 0; i < pa->count; ++i) EXPECT_EQ(pa->bytes[i] % 16, 0u);
  // Two groups of 4 matrices after a: 24 regions; the list stops at kW4MaxPrefetch (the nearest first).
  W4Device group2[4] = {mat(0x60000000, 16, 1024), mat(0x70000000, 16, 1024), mat(0x80000000, 16, 1024),
                        mat(0x90000000, 16, 1024)};
  W4PrefetchChain big(size_t(1) << 30);
  for (int step = 0; step < 2; ++step) {
    const W4Prefetch* pg = big.prefetch(&a, 1);
    big.prefetch(group, 4);
    big.prefetch(group2, 4);
    if (step == 0) continue;
    ASSERT_NE(pg, nullptr);
    EXPECT_EQ(pg->count, kW4MaxPrefetch);
    EXPECT_EQ(pg->ptr[0], group[0].q);
    EXPECT_EQ(pg->ptr[12], group2[0].q);
  }
  // Off: never anything.
  W4PrefetchChain off(0);
  off.prefetch(&a, 1);
  off.prefetch(group, 4);
  EXPECT_EQ(off.prefetch(&a, 1), nullptr);
}
