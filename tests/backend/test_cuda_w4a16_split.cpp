// The general W4A16 kernel's two warp layouts (W4GemmOptions::token_split): one row tile × all tokens per warp,
// and two row tiles × half the tokens (the default from 33 tokens on, T >= 8). Each output is summed by one warp in the
// same k order either way, so the outputs must be bit-identical, with and without split-K, per channel and
// grouped, including shapes whose last row pair has a single tile (n_pad / 16 odd) and partial token tiles.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/error.h"
#include "w4a16_test_util.h"

namespace spear {

using namespace w4test;

TEST(W4A16TokenSplit, BitIdenticalToOneTilePerWarp) {
  SKIP_WITHOUT_GPU();
  const int sms = cuda::device_info(0).sm_count;
  struct Case {
    int n, k, group;
  };
  // 513: 33 row tiles (odd: a lone tile in the last pair); 4096 x 4096 g128: the 8B q/o shape.
  const Case cases[] = {{513, 1000, -1}, {513, 1000, 64}, {4096, 4096, 128}, {1024, 4096, -1}, {100, 2048, 32}};
  uint32_t seed = 7100;
  for (const Case& c : cases) {
    UploadedW4 w(cuda::w4_prepare(random_quantized(c.n, c.k, 4, c.group, seed)));
    const W4DevBuf<uint16_t> bias(random_bf16(c.n, seed + 1, 0.1f));
    const size_t ws_bytes = cuda::w4a16_workspace_bytes(128, c.n, c.k, sms);
    W4DevBuf<unsigned char> ws(ws_bytes);
    SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws_bytes));
    for (int m : {33, 57, 64, 65, 100, 128, 300}) {
      W4DevBuf<uint16_t> x(random_bf16(size_t(m) * c.k, seed + 2 + uint32_t(m)));
      const std::vector<float> ref = run_reference(x, m, w.dev, bf(bias));
      for (bool with_ws : {true, false}) {
        std::vector<uint16_t> raw[3];
        for (int split : {1, 2}) {
          cuda::W4GemmOptions o;
          o.token_split = split;
          ScopedW4Options scoped(o);
          const std::string what = shape_name(c.n, c.k, c.group, 4) + " m=" + std::to_string(m) +
                                   " token_split=" + std::to_string(split) + (with_ws ? "" : " no workspace");
          const std::vector<float> got = run_fast(x, m, w.dev, bf(bias), with_ws ? ws.get() : nullptr,
                                                  with_ws ? ws_bytes : 0, sms, what, &raw[split]);
          EXPECT_LT(rel_err(got, ref), 1e-2) << what;
        }
        EXPECT_TRUE(raw[1] == raw[2]) << shape_name(c.n, c.k, c.group, 4) << " m=" << m << (with_ws ? "" : " no ws")
                                      << ": token split changes the outputs";
        if (HasFailure()) return;
      }
    }
    seed += 10;
  }
}

TEST(W4A16TokenSplit, OptionIsValidated) {
  cuda::W4GemmOptions bad;
  bad.token_split = 3;
  EXPECT_THROW(cuda::w4a16_set_options(bad), Error);
  bad.token_split = -1;
  EXPECT_THROW(cuda::w4a16_set_options(bad), Error);
}

}  // namespace spear
