// Fused tensor-parallel tail (tp_tail_bf16): R = 2 and 3 ranks simulated on ONE GPU (every rank's buffers on
// device 0, each rank's kernel on its own stream, running concurrently), against the CPU reference within bf16
// tolerance, bit-identical across ranks; no EC, static and gated ECs; T = 1, 5, 64; H = 4096, 1000 and 1003 (the
// element-wise path); 20 back-to-back calls of varying T (per-row epochs and parities reused, the residual
// chained through the calls); a CUDA graph of 3 calls per rank replayed twice; the W4 GEMM's dual-write of its
// rows into the staging. With one rank and no EC the kernel is bit-identical to add_rms_norm_bf16. Skips without a
// GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rms_norm.h"
#include "backend/cuda/tp_tail.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/dtype.h"
#include "w4a16_test_util.h"

namespace spear {
namespace {

using bf16 = __nv_bfloat16;

// A rank that never arrives (a protocol bug) makes the kernel trap after this long instead of hanging the binary.
constexpr uint64_t kTimeoutNs = 20'000'000'000ull;
constexpr float kEps = 1e-5f;
constexpr int kMaxH = 4096, kMaxRows = cuda::kTpTailMaxRows;

// Device memory on device 0.
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(size_t n_bytes) : bytes(std::max<size_t>(n_bytes, 16)) { SPEAR_CUDA_CHECK(cudaMalloc(&p, bytes)); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  bf16* b() const { return static_cast<bf16*>(p); }
  float* f() const { return static_cast<float*>(p); }
};

template <typename T>
std::unique_ptr<Dev> upload(const std::vector<T>& v) {
  auto d = std::make_unique<Dev>(v.size() * sizeof(T));
  SPEAR_CUDA_CHECK(cudaMemcpy(d->p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<uint16_t> download(const void* p, size_t n) {
  std::vector<uint16_t> v(n);
  SPEAR_CUDA_CHECK(cudaMemcpy(v.data(), p, n * 2, cudaMemcpyDeviceToHost));
  return v;
}

// A compensator split over `ranks` (A by columns, uneven widths allowed), with its device copies: A as bf16 per
// rank (CudaEc::A16), B and the gate fp32 (one copy serves every simulated rank).
struct Ec {
  cuda::TpTailEcHost host;
  std::vector<std::vector<float>> A;  // [rank][r][k_q], bf16-representable
  std::vector<float> B, W1, b1, W2, b2;
  std::vector<std::unique_ptr<Dev>> dA;
  std::unique_ptr<Dev> dB, dB16, dW1, db1, dW2, db2;
  std::vector<cuda::TpTailEc> dev;  // per rank
};

std::unique_ptr<Ec> make_ec(int ranks, int r, int w, const std::vector<int>& in, int H, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  auto ec = std::make_unique<Ec>();
  int k_total = 0;
  for (int k : in) k_total += k;
  const float a_std = 1.f / std::sqrt(float(k_total));  // z ~ N(0, 1) for xs ~ N(0, 1)
  ec->A.resize(size_t(ranks));
  for (int q = 0; q < ranks; ++q) {
    auto& a = ec->A[size_t(q)];
    a.resize(size_t(r) * in[size_t(q)]);
    for (float& v : a) v = bf16_to_f32(f32_to_bf16(a_std * nd(rng)));
  }
  auto fill = [&](std::vector<float>& v, size_t n, float std) {
    v.resize(n);
    for (float& x : v) x = std * nd(rng);
  };
  fill(ec->B, size_t(H) * r, 0.5f / std::sqrt(float(r)));
  for (float& v : ec->B) v = bf16_to_f32(f32_to_bf16(v));  // the kernel reads the bf16 copy where r % 8 == 0
  if (w > 0) {  // a gate far from 1: u ~ N(0, ~1), so g spreads over (0, 2)
    fill(ec->W1, size_t(w) * r, 1.f / std::sqrt(float(r)));
    fill(ec->b1, size_t(w), 0.1f);
    fill(ec->W2, size_t(r) * w, 1.5f / std::sqrt(float(w)));
    fill(ec->b2, size_t(r), 0.1f);
  }
  ec->host.rank = r;
  ec->host.gate_width = w;
  ec->host.in = in;
  for (auto& a : ec->A) ec->host.A.push_back(a.data());
  ec->host.B = ec->B.data();
  ec->dB = upload(ec->B);
  std::vector<uint16_t> b16(ec->B.size());
  for (size_t i = 0; i < b16.size(); ++i) b16[i] = f32_to_bf16(ec->B[i]);
  ec->dB16 = upload(b16);
  if (w > 0) {
    ec->host.W1 = ec->W1.data(), ec->host.b1 = ec->b1.data(), ec->host.W2 = ec->W2.data(), ec->host.b2 = ec->b2.data();
    ec->dW1 = upload(ec->W1), ec->db1 = upload(ec->b1), ec->dW2 = upload(ec->W2), ec->db2 = upload(ec->b2);
  }
  for (int q = 0; q < ranks; ++q) {
    std::vector<uint16_t> a16(ec->A[size_t(q)].size());
    for (size_t i = 0; i < a16.size(); ++i) a16[i] = f32_to_bf16(ec->A[size_t(q)][i]);
    ec->dA.push_back(upload(a16));
    cuda::TpTailEc d;
    d.rank = r;
    d.gate_width = w;
    d.in = in[size_t(q)];
    d.A = ec->dA.back()->b();
    d.B = ec->dB->f();
    d.B16 = ec->dB16->b();  // used where r % 8 == 0 (r = 24, 64 below; r = 13 reads the fp32 B)
    if (w > 0) d.W1 = ec->dW1->f(), d.b1 = ec->db1->f(), d.W2 = ec->dW2->f(), d.b2 = ec->db2->f();
    ec->dev.push_back(d);
  }
  return ec;
}

// Elements agree within bf16 rounding of the reference's own scale: per element |got - ref| <= (|ref| + 4 · rms of
// the row) / 64 (a flipped rounding of y or x costs at most an ulp of each), and the relative RMS error over all
// rows < 2e-3 (most elements are bit-equal; a missing or doubled contribution is off by O(1)).
void expect_close(const std::vector<uint16_t>& got, const std::vector<uint16_t>& ref, int rows, int H,
                  const std::string& what) {
  int64_t bad = 0, first = -1;
  double num = 0, den = 0;
  for (int t = 0; t < rows; ++t) {
    double rms = 0;
    for (int n = 0; n < H; ++n)
      rms += double(bf16_to_f32(ref[size_t(t) * H + n])) * bf16_to_f32(ref[size_t(t) * H + n]);
    rms = std::sqrt(rms / H);
    for (int n = 0; n < H; ++n) {
      const size_t i = size_t(t) * H + n;
      const double g = bf16_to_f32(got[i]), r = bf16_to_f32(ref[i]);
      const double err = std::fabs(g - r);
      if (!std::isfinite(g) || err > (std::fabs(r) + 4 * rms) / 64) {
        if (bad++ == 0) first = int64_t(i);
      }
      if (std::isfinite(g)) num += err * err;
      den += r * r;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements off, first at row " << (first >= 0 ? first / H : -1) << " col "
                    << (first >= 0 ? first % H : -1) << " (got " << (first >= 0 ? bf16_to_f32(got[size_t(first)]) : 0.f)
                    << ", want " << (first >= 0 ? bf16_to_f32(ref[size_t(first)]) : 0.f) << ")";
  EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 2e-3) << what;
}

class CudaTpTail : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    SPEAR_CUDA_CHECK(cudaSetDevice(0));
    for (int q = 0; q < cuda::kTpTailMaxRanks && q < 3; ++q) {
      cudaStream_t s;
      SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      streams_.push_back(s);
    }
  }

  void TearDown() override {
    for (cudaStream_t s : streams_) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
    free_ranks();
  }

  // Every rank's buffers on device 0, each rank's peers built from the raw pointers (one device: no peer access).
  void setup_ranks(int ranks) {
    free_ranks();
    ranks_ = ranks;
    for (int q = 0; q < ranks; ++q)
      bufs_.push_back(cuda::tp_tail_alloc_rank_buffers(0, ranks, kMaxH, cuda::kTpTailMaxRank, kMaxRows));
    for (int q = 0; q < ranks; ++q) {
      peers_.push_back(cuda::tp_tail_peers_in_process(bufs_, q));
      peers_.back().timeout_ns = kTimeoutNs;
    }
  }

  void free_ranks() {
    for (auto& b : bufs_) cuda::tp_tail_free_rank_buffers(b);
    bufs_.clear();
    peers_.clear();
    ranks_ = 0;
  }

  void sync_streams() {
    for (int q = 0; q < ranks_; ++q) SPEAR_CUDA_CHECK(cudaStreamSynchronize(streams_[size_t(q)]));
  }

  std::vector<uint16_t> random_bf16(size_t n, float std, float mean = 0.f) {
    std::normal_distribution<float> nd(mean, std);
    std::vector<uint16_t> v(n);
    for (auto& h : v) h = f32_to_bf16(nd(rng_));
    return v;
  }

  // A sequence of calls of one module on every rank: inputs per [call][rank], the residual per rank (the same
  // values on every rank, chained through the calls), outputs h per [call][rank].
  struct Calls {
    int H = 0;
    int in = 0;  // width of xs without an EC (the W4 GEMM's input in the dual-write test); 0: no xs
    const Ec* ec = nullptr;
    std::vector<int> Ts;
    std::vector<std::vector<std::vector<uint16_t>>> y, xs;  // host [call][rank]
    std::vector<uint16_t> x0, w;
    std::vector<std::vector<std::unique_ptr<Dev>>> dy, dxs, dh;  // [call][rank]
    std::vector<std::unique_ptr<Dev>> dx;                        // [rank]: [kMaxRows, H]
    std::unique_ptr<Dev> dw;
  };

  std::unique_ptr<Calls> make_calls(int H, const Ec* ec, const std::vector<int>& Ts, int in = 0) {
    auto c = std::make_unique<Calls>();
    c->H = H;
    c->in = in;
    c->ec = ec;
    c->Ts = Ts;
    c->w = random_bf16(size_t(H), 0.1f, 1.f);
    c->dw = upload(c->w);
    for (size_t i = 0; i < Ts.size(); ++i) {
      c->y.emplace_back(size_t(ranks_));
      c->xs.emplace_back(size_t(ranks_));
      c->dy.emplace_back();
      c->dxs.emplace_back();
      c->dh.emplace_back();
      for (int q = 0; q < ranks_; ++q) {
        c->dy.back().push_back(std::make_unique<Dev>(size_t(Ts[i]) * H * 2));
        c->dh.back().push_back(std::make_unique<Dev>(size_t(Ts[i]) * H * 2));
        const int k = ec ? ec->host.in[size_t(q)] : in;
        c->dxs.back().push_back(std::make_unique<Dev>(size_t(Ts[i]) * k * 2));
      }
    }
    for (int q = 0; q < ranks_; ++q) c->dx.push_back(std::make_unique<Dev>(size_t(kMaxRows) * H * 2));
    refill(*c);
    return c;
  }

  // New random inputs and residual, uploaded; the outputs poisoned (every element must be written).
  void refill(Calls& c) {
    c.x0 = random_bf16(size_t(kMaxRows) * c.H, 1.4f);
    for (size_t i = 0; i < c.Ts.size(); ++i) {
      const size_t T = size_t(c.Ts[i]);
      for (int q = 0; q < ranks_; ++q) {
        c.y[i][size_t(q)] = random_bf16(T * c.H, 1.f);
        SPEAR_CUDA_CHECK(
            cudaMemcpy(c.dy[i][size_t(q)]->p, c.y[i][size_t(q)].data(), T * c.H * 2, cudaMemcpyHostToDevice));
        if (c.ec || c.in) {
          const size_t k = size_t(c.ec ? c.ec->host.in[size_t(q)] : c.in);
          c.xs[i][size_t(q)] = random_bf16(T * k, 1.f);
          SPEAR_CUDA_CHECK(
              cudaMemcpy(c.dxs[i][size_t(q)]->p, c.xs[i][size_t(q)].data(), T * k * 2, cudaMemcpyHostToDevice));
        }
        SPEAR_CUDA_CHECK(cudaMemset(c.dh[i][size_t(q)]->p, 0xff, T * c.H * 2));
      }
    }
    for (int q = 0; q < ranks_; ++q)
      SPEAR_CUDA_CHECK(cudaMemcpy(c.dx[size_t(q)]->p, c.x0.data(), c.x0.size() * 2, cudaMemcpyHostToDevice));
    // Pageable copies and memsets may still be in flight on return; the streams do not order with them.
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  }

  void launch(const Calls& c, size_t i, int q, bool y_mirrored = false) {
    const cuda::TpTailEc* ec = c.ec ? &c.ec->dev[size_t(q)] : nullptr;
    const bf16* xs = c.ec && c.dxs[i].size() > size_t(q) ? c.dxs[i][size_t(q)]->b() : nullptr;
    cuda::tp_tail_bf16(c.dy[i][size_t(q)]->b(), xs, ec, c.dx[size_t(q)]->b(), c.dw->b(), c.dh[i][size_t(q)]->b(),
                       c.Ts[i], c.H, kEps, peers_[size_t(q)], q, streams_[size_t(q)], y_mirrored);
  }

  // Rank by rank: rank 0 queues all its calls before rank 1 queues any, so the ranks start far apart.
  void launch_all(const Calls& c) {
    for (int q = 0; q < ranks_; ++q)
      for (size_t i = 0; i < c.Ts.size(); ++i) launch(c, i, q);
  }

  // Every call's h and the final x of every rank against the CPU reference run through the same calls, and
  // bit-identical across ranks.
  void check(const Calls& c, const std::string& what) {
    std::vector<uint16_t> x = c.x0;
    for (size_t i = 0; i < c.Ts.size(); ++i) {
      const int T = c.Ts[i];
      std::vector<const uint16_t*> ys, xss;
      for (int q = 0; q < ranks_; ++q) {
        ys.push_back(c.y[i][size_t(q)].data());
        xss.push_back(c.ec ? c.xs[i][size_t(q)].data() : nullptr);
      }
      std::vector<uint16_t> h(size_t(T) * c.H);
      cuda::tp_tail_reference(ranks_, T, c.H, ys.data(), xss.data(), c.ec ? &c.ec->host : nullptr, x.data(), c.w.data(),
                              h.data(), kEps);
      std::vector<uint16_t> h0;
      for (int q = 0; q < ranks_; ++q) {
        const std::vector<uint16_t> got = download(c.dh[i][size_t(q)]->p, h.size());
        const std::string tag = what + ", call " + std::to_string(i) + " (T = " + std::to_string(T) + "), rank " +
                                std::to_string(q) + ": h";
        expect_close(got, h, T, c.H, tag);
        if (q == 0)
          h0 = got;
        else
          EXPECT_TRUE(got == h0) << tag << " differs from rank 0's";
      }
    }
    std::vector<uint16_t> x0;
    for (int q = 0; q < ranks_; ++q) {
      const std::vector<uint16_t> got = download(c.dx[size_t(q)]->p, x.size());
      const std::string tag = what + ", rank " + std::to_string(q) + ": final x";
      expect_close(got, x, kMaxRows, c.H, tag);
      if (q == 0)
        x0 = got;
      else
        EXPECT_TRUE(got == x0) << tag << " differs from rank 0's";
    }
  }

  // k_q of each rank: 512 (vector A path) with H = 4096, else uneven and not a multiple of 8 (element-wise path).
  std::vector<int> widths(int ranks, int H) {
    std::vector<int> in;
    for (int q = 0; q < ranks; ++q) in.push_back(H == 4096 ? 512 : 333 + q);
    return in;
  }

  int ranks_ = 0;
  std::vector<cuda::TpTailRankBuffers> bufs_;
  std::vector<cuda::TpTailPeers> peers_;
  std::vector<cudaStream_t> streams_;
  std::mt19937 rng_{23};
};

struct EcKind {
  const char* name;
  int rank, gate;  // rank 0: no EC
};
// Static and gated; rank 13 (not a multiple of 4) takes the element-wise B path.
constexpr EcKind kEcKinds[] = {
    {"no EC", 0, 0}, {"static EC r=24", 24, 0}, {"gated EC r=64 w=16", 64, 16}, {"gated EC r=13 w=64", 13, 64}};

TEST_F(CudaTpTail, MatchesReferenceAcrossRanks) {
  for (int ranks : {2, 3}) {
    setup_ranks(ranks);
    for (const EcKind& k : kEcKinds)
      for (int H : {4096, 1000, 1003})
        for (int T : {1, 5, 64}) {
          std::unique_ptr<Ec> ec = k.rank ? make_ec(ranks, k.rank, k.gate, widths(ranks, H), H, rng_) : nullptr;
          auto calls = make_calls(H, ec.get(), {T});
          launch_all(*calls);
          sync_streams();
          check(*calls, std::string(k.name) + ", R = " + std::to_string(ranks) + ", H = " + std::to_string(H));
        }
  }
}

// 20 calls queued back to back, T varying (row 0 runs every call, row 63 only in the T = 64 ones, so the rows'
// epochs and parities diverge), the residual chained through them.
TEST_F(CudaTpTail, BackToBackCallsReuseStaging) {
  const std::vector<int> Ts = {1, 5, 64, 64, 3, 1, 64, 2, 5, 5, 64, 1, 1, 7, 64, 33, 64, 1, 5, 64};
  for (int ranks : {2, 3}) {
    setup_ranks(ranks);
    for (const EcKind& k : {kEcKinds[0], kEcKinds[2]}) {
      std::unique_ptr<Ec> ec = k.rank ? make_ec(ranks, k.rank, k.gate, widths(ranks, 4096), 4096, rng_) : nullptr;
      auto calls = make_calls(4096, ec.get(), Ts);
      launch_all(*calls);
      sync_streams();
      check(*calls, std::string(k.name) + ", 20 calls, R = " + std::to_string(ranks));
    }
  }
}

// 3 calls captured per rank stream, replayed twice with new inputs: the epochs come from device memory.
TEST_F(CudaTpTail, CudaGraphReplays) {
  for (int ranks : {2, 3}) {
    setup_ranks(ranks);
    std::unique_ptr<Ec> ec = make_ec(ranks, 64, 16, widths(ranks, 4096), 4096, rng_);
    auto calls = make_calls(4096, ec.get(), {5, 64, 1});
    // Calls outside the graph first, so that the graph starts at odd epochs on some rows.
    launch_all(*calls);
    sync_streams();
    check(*calls, "before capture, R = " + std::to_string(ranks));
    std::vector<cudaGraph_t> graphs(size_t(ranks), nullptr);
    std::vector<cudaGraphExec_t> execs(size_t(ranks), nullptr);
    for (int q = 0; q < ranks; ++q)
      SPEAR_CUDA_CHECK(cudaStreamBeginCapture(streams_[size_t(q)], cudaStreamCaptureModeThreadLocal));
    for (int q = 0; q < ranks; ++q)
      for (size_t i = 0; i < calls->Ts.size(); ++i) launch(*calls, i, q);
    // Every capture ends before any instantiation: a thread-local capture still open on another stream forbids it.
    for (int q = 0; q < ranks; ++q) SPEAR_CUDA_CHECK(cudaStreamEndCapture(streams_[size_t(q)], &graphs[size_t(q)]));
    for (int q = 0; q < ranks; ++q) SPEAR_CUDA_CHECK(cudaGraphInstantiate(&execs[size_t(q)], graphs[size_t(q)], 0));
    for (int rep = 0; rep < 2; ++rep) {
      refill(*calls);
      for (int q = 0; q < ranks; ++q) SPEAR_CUDA_CHECK(cudaGraphLaunch(execs[size_t(q)], streams_[size_t(q)]));
      sync_streams();
      check(*calls, "graph replay " + std::to_string(rep) + ", R = " + std::to_string(ranks));
    }
    for (int q = 0; q < ranks; ++q) {
      SPEAR_CUDA_CHECK(cudaGraphExecDestroy(execs[size_t(q)]));
      SPEAR_CUDA_CHECK(cudaGraphDestroy(graphs[size_t(q)]));
    }
  }
}

// z_q precomputed by the caller (TpTailEc::z, as linear_ec_partial's ec_project gives it) instead of A · xs in the
// kernel: A and xs are not read (null here).
TEST_F(CudaTpTail, PrecomputedPartialZ) {
  for (int ranks : {2, 3}) {
    setup_ranks(ranks);
    for (int T : {5, 64}) {
      std::unique_ptr<Ec> ec = make_ec(ranks, 64, 16, widths(ranks, 4096), 4096, rng_);
      auto calls = make_calls(4096, ec.get(), {T});
      std::vector<std::unique_ptr<Dev>> dz;
      for (int q = 0; q < ranks; ++q) {
        const int r = ec->host.rank, k = ec->host.in[size_t(q)];
        std::vector<float> z(size_t(T) * r);
        for (int t = 0; t < T; ++t)
          for (int j = 0; j < r; ++j) {
            double acc = 0;
            for (int i = 0; i < k; ++i)
              acc +=
                  double(ec->A[size_t(q)][size_t(j) * k + i]) * bf16_to_f32(calls->xs[0][size_t(q)][size_t(t) * k + i]);
            z[size_t(t) * r + j] = float(acc);
          }
        dz.push_back(upload(z));
        ec->dev[size_t(q)].z = dz.back()->f();
        ec->dev[size_t(q)].A = nullptr;
      }
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      calls->dxs.clear();  // (launch() passes xs only when the EC needs it; here it must not be read)
      for (size_t i = 0; i < calls->Ts.size(); ++i) calls->dxs.emplace_back();
      launch_all(*calls);
      sync_streams();
      check(*calls, "precomputed z, T = " + std::to_string(T) + ", R = " + std::to_string(ranks));
    }
  }
}

// The P2P dual-write: each simulated rank's W4 decode GEMM also stores its output into the peers' staging from its
// epilogue (w4a16_gemm_mirrored), and the tail does not push it. Against the same calls with a plain w4a16_gemm
// and the tail pushing: h and x bit for bit (same plans, same sums), and those against the CPU reference on the
// GEMM's outputs. One to four token tiles back to back (parities and epochs reused), per channel and group 128,
// without and with a gated EC (its z still pushed by the tail), R = 2 and 3.
TEST_F(CudaTpTail, GemmEpilogueDualWriteEqualsTailPush) {
  constexpr int H = 4096, K = 1024;
  const std::vector<int> Ts = {1, 3, 8, 17, 32, 1, 9};
  const int sm_count = cuda::device_info(0).sm_count;
  w4test::W4DevBuf<unsigned char> ws(cuda::w4a16_workspace_bytes(32, H, K, sm_count));
  SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, ws.size()));
  for (int ranks : {2, 3})
    for (int group : {-1, 128})
      for (bool with_ec : {false, true}) {
        setup_ranks(ranks);
        const std::string what =
            "R = " + std::to_string(ranks) + ", group " + std::to_string(group) + (with_ec ? ", gated EC" : ", no EC");
        std::vector<std::unique_ptr<w4test::UploadedW4>> w;
        for (int q = 0; q < ranks; ++q)
          w.push_back(std::make_unique<w4test::UploadedW4>(
              cuda::w4_prepare(w4test::random_quantized(H, K, 4, group, 100u + uint32_t(q)))));
        std::unique_ptr<Ec> ec = with_ec ? make_ec(ranks, 16, 8, std::vector<int>(size_t(ranks), K), H, rng_) : nullptr;
        auto calls = make_calls(H, ec.get(), Ts, K);  // xs: the GEMM's input [T, K] per call and rank
        auto run = [&](bool mirrored) {
          for (int q = 0; q < ranks; ++q) {  // rank by rank, so the ranks start far apart
            const cuda::W4PeerMirror mirror = cuda::tp_tail_mirror(peers_[size_t(q)], q);
            for (size_t i = 0; i < Ts.size(); ++i) {
              const bf16* x = calls->dxs[i][size_t(q)]->b();
              bf16* y = calls->dy[i][size_t(q)]->b();
              if (mirrored)
                ASSERT_TRUE(cuda::w4a16_gemm_mirrored(x, Ts[i], w[size_t(q)]->dev, nullptr, y, mirror, sm_count,
                                                      streams_[size_t(q)]))
                    << what << ": the decode kernel did not take T = " << Ts[i];
              else
                cuda::w4a16_gemm(x, Ts[i], w[size_t(q)]->dev, nullptr, y, ws.get(), ws.size(), sm_count,
                                 streams_[size_t(q)]);
              launch(*calls, i, q, mirrored);
            }
          }
          sync_streams();
        };
        // Without the dual-write first: the GEMM outputs become the reference's inputs.
        run(false);
        std::vector<std::vector<std::vector<uint16_t>>> h_push(Ts.size());
        for (size_t i = 0; i < Ts.size(); ++i)
          for (int q = 0; q < ranks; ++q) {
            const size_t n = size_t(Ts[i]) * H;
            calls->y[i][size_t(q)] = download(calls->dy[i][size_t(q)]->p, n);
            h_push[i].push_back(download(calls->dh[i][size_t(q)]->p, n));
          }
        const std::vector<uint16_t> x_push = download(calls->dx[0]->p, size_t(kMaxRows) * H);
        check(*calls, what + ", the tail pushing");
        // Again with the dual-write, from the same residual and poisoned outputs.
        for (int q = 0; q < ranks; ++q) {
          SPEAR_CUDA_CHECK(
              cudaMemcpy(calls->dx[size_t(q)]->p, calls->x0.data(), calls->x0.size() * 2, cudaMemcpyHostToDevice));
          for (size_t i = 0; i < Ts.size(); ++i)
            SPEAR_CUDA_CHECK(cudaMemset(calls->dh[i][size_t(q)]->p, 0xff, size_t(Ts[i]) * H * 2));
        }
        SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
        run(true);
        for (size_t i = 0; i < Ts.size(); ++i)
          for (int q = 0; q < ranks; ++q)
            EXPECT_TRUE(download(calls->dh[i][size_t(q)]->p, size_t(Ts[i]) * H) == h_push[i][size_t(q)])
                << what << ", call " << i << " (T = " << Ts[i] << "), rank " << q << ": h differs with the dual-write";
        for (int q = 0; q < ranks; ++q)
          EXPECT_TRUE(download(calls->dx[size_t(q)]->p, size_t(kMaxRows) * H) == x_push)
              << what << ", rank " << q << ": final x differs with the dual-write";
      }
}

// One rank, no EC: bit-identical to add_rms_norm_bf16 (the unfused x += y; h = RMSNorm(x)), signed zeros included.
TEST_F(CudaTpTail, SingleRankMatchesAddRmsNormBitExact) {
  cudaStream_t s = streams_[0];
  for (int H : {4096, 1000, 1003})
    for (int T : {1, 5, 64}) {
      const size_t n = size_t(T) * H;
      std::vector<uint16_t> y = random_bf16(n, 1.f), x = random_bf16(n, 1.4f), w = random_bf16(size_t(H), 0.1f, 1.f);
      x[0] = y[0] = 0x8000;  // -0 + -0 = -0 (an fp32 sum started at +0 would give +0)
      x[1] = 0x8000, y[1] = 0;
      auto dy = upload(y), dx1 = upload(x), dx2 = upload(x), dw = upload(w);
      Dev dh1(n * 2), dh2(n * 2);
      SPEAR_CUDA_CHECK(cudaMemset(dh1.p, 0xff, n * 2));
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
      cuda::tp_tail_bf16(dy->b(), nullptr, nullptr, dx1->b(), dw->b(), dh1.b(), T, H, kEps, cuda::TpTailPeers{}, 0, s);
      cuda::add_rms_norm_bf16(dx2->b(), dy->b(), dw->b(), dh2.b(), T, H, kEps, s);
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(s));
      const std::string tag = "T = " + std::to_string(T) + ", H = " + std::to_string(H);
      EXPECT_TRUE(download(dx1->p, n) == download(dx2->p, n)) << tag << ": x differs from add_rms_norm's";
      EXPECT_TRUE(download(dh1.p, n) == download(dh2.p, n)) << tag << ": h differs from add_rms_norm's";
    }
}

// One rank with an EC (the single-GPU use of the fused tail): against the reference.
TEST_F(CudaTpTail, SingleRankWithEcMatchesReference) {
  ranks_ = 1;
  peers_.assign(1, cuda::TpTailPeers{});
  for (const EcKind& k : kEcKinds)
    for (int H : {4096, 1003}) {
      std::unique_ptr<Ec> ec = k.rank ? make_ec(1, k.rank, k.gate, widths(1, H), H, rng_) : nullptr;
      auto calls = make_calls(H, ec.get(), {1, 5, 64});
      launch_all(*calls);
      sync_streams();
      check(*calls, std::string(k.name) + ", R = 1, H = " + std::to_string(H));
    }
  peers_.clear();
  ranks_ = 0;
}

}  // namespace
}  // namespace spear
