// P2P dual-write all-reduce (p2p_allreduce_bf16) among the GPUs of this process, one host thread launching to each
// device's own stream: bit-exact against the CPU reference (rank-order fp32 sum, one bf16 rounding) on every rank,
// back-to-back calls of mixed sizes (the staging parities and per-CTA epochs are reused), fp32 calls between bf16
// ones, and replays of a CUDA graph. Skips without two GPUs that can access each other's memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <memory>
#include <random>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/p2p_reduce.h"
#include "core/dtype.h"

namespace spear {
namespace {

using bf16 = __nv_bfloat16;

// A rank that never arrives makes the kernel trap after this long instead of hanging the test binary.
constexpr uint64_t kTimeoutNs = 20'000'000'000ull;

// Device memory on one device, freed on that device.
struct DeviceBuffer {
  int device = 0;
  bf16* p = nullptr;
  DeviceBuffer(int dev, int64_t elems) : device(dev) {
    SPEAR_CUDA_CHECK(cudaSetDevice(dev));
    SPEAR_CUDA_CHECK(cudaMalloc(&p, size_t(std::max<int64_t>(elems, 8)) * 2));
  }
  ~DeviceBuffer() {
    cudaSetDevice(device);
    cudaFree(p);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

class CudaP2pReduce : public ::testing::Test {
 protected:
  void SetUp() override {
    const int count = cuda::device_count();
    if (count < 2) GTEST_SKIP() << "needs 2 GPUs, found " << count;
    ranks_ = std::min(count, cuda::kP2pMaxRanks);
    std::vector<int> devices(static_cast<size_t>(ranks_));
    for (int r = 0; r < ranks_; ++r) devices[size_t(r)] = r;
    if (!cuda::p2p_enable_peer_access(devices)) GTEST_SKIP() << "no peer access between the GPUs";
    for (int r = 0; r < ranks_; ++r) bufs_.push_back(cuda::p2p_alloc_rank_buffers(r, ranks_, kCapacity));
    for (int r = 0; r < ranks_; ++r) {
      peers_.push_back(cuda::p2p_peers_in_process(bufs_, r));
      peers_.back().timeout_ns = kTimeoutNs;
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      cudaStream_t s;
      SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      streams_.push_back(s);
    }
  }

  void TearDown() override {
    for (int r = 0; r < int(streams_.size()); ++r) {
      cudaSetDevice(r);
      cudaStreamSynchronize(streams_[size_t(r)]);
      cudaStreamDestroy(streams_[size_t(r)]);
    }
    for (auto& b : bufs_) cuda::p2p_free_rank_buffers(b);
  }

  // Every launch is enqueued before any host wait: a rank's kernel spins until its peers' kernels run, so a
  // blocking call between two ranks' launches would dead-lock.
  void sync_all() {
    for (int r = 0; r < ranks_; ++r) {
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(streams_[size_t(r)]));
    }
  }

  // Before launching: cudaMemcpy from pageable memory and cudaMemset may still be in flight on return, and the
  // streams here do not synchronize with the legacy default stream.
  void sync_devices() {
    for (int r = 0; r < ranks_; ++r) {
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

  std::vector<uint16_t> random_bf16(int64_t n) {
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<uint16_t> v(static_cast<size_t>(n));
    for (auto& h : v) h = f32_to_bf16(nd(rng_));
    return v;
  }

  static void upload(int device, bf16* dst, const std::vector<uint16_t>& src) {
    SPEAR_CUDA_CHECK(cudaSetDevice(device));
    SPEAR_CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * 2, cudaMemcpyHostToDevice));
  }

  static std::vector<uint16_t> download(int device, const bf16* src, int64_t n) {
    std::vector<uint16_t> v(static_cast<size_t>(n));
    SPEAR_CUDA_CHECK(cudaSetDevice(device));
    SPEAR_CUDA_CHECK(cudaMemcpy(v.data(), src, v.size() * 2, cudaMemcpyDeviceToHost));
    return v;
  }

  // Output of every rank equals the CPU reference of the inputs bit for bit (hence the ranks agree too).
  void expect_reduced(const std::vector<std::vector<uint16_t>>& inputs, const std::vector<const bf16*>& outs, int64_t n,
                      const char* what) {
    std::vector<const uint16_t*> xs;
    for (const auto& in : inputs) xs.push_back(in.data());
    std::vector<uint16_t> ref(static_cast<size_t>(n));
    cuda::p2p_allreduce_reference_bf16(xs.data(), ranks_, n, ref.data());
    std::vector<uint16_t> rank0;
    for (int r = 0; r < ranks_; ++r) {
      const std::vector<uint16_t> got = download(r, outs[size_t(r)], n);
      int64_t bad = 0, first = -1;
      for (int64_t i = 0; i < n; ++i)
        if (got[size_t(i)] != ref[size_t(i)] && bad++ == 0) first = i;
      EXPECT_EQ(bad, 0) << what << ", n = " << n << ", rank " << r << ": " << bad << " elements differ from the "
                        << "reference, first at " << first << " (got 0x" << std::hex
                        << (first >= 0 ? got[size_t(first)] : 0) << ", want 0x" << (first >= 0 ? ref[size_t(first)] : 0)
                        << std::dec << ")";
      if (r == 0)
        rank0 = got;
      else
        EXPECT_TRUE(got == rank0) << what << ", n = " << n << ": rank " << r << " differs from rank 0";
    }
  }

  // Rank r's peers with the LL protocol on (as allocated) or off (every call takes the flag protocol).
  cuda::P2pPeers peers_of(int r, bool ll) const {
    cuda::P2pPeers p = peers_[size_t(r)];
    if (!ll) p.ll_max_blocks = 0;
    return p;
  }

  static constexpr int64_t kCapacity = 524288;
  int ranks_ = 0;
  std::vector<cuda::P2pRankBuffers> bufs_;
  std::vector<cuda::P2pPeers> peers_;
  std::vector<cudaStream_t> streams_;
  std::mt19937 rng_{17};
};

// Both protocols on the same sizes. The LL protocol takes every call of up to 256 KB by default.
TEST_F(CudaP2pReduce, MatchesReferenceBitExact) {
  EXPECT_TRUE(cuda::p2p_allreduce_uses_ll(4096, 2, peers_[0]));
  EXPECT_TRUE(cuda::p2p_allreduce_uses_ll(131072, 2, peers_[0]));
  EXPECT_FALSE(cuda::p2p_allreduce_uses_ll(131073, 2, peers_[0]));
  EXPECT_FALSE(cuda::p2p_allreduce_uses_ll(4096, 2, peers_of(0, false)));
  for (bool ll : {true, false})
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(4096), int64_t(65536 + 3), int64_t(131072), kCapacity}) {
      std::vector<std::vector<uint16_t>> in;
      std::vector<std::unique_ptr<DeviceBuffer>> x, out;
      for (int r = 0; r < ranks_; ++r) {
        in.push_back(random_bf16(n));
        x.push_back(std::make_unique<DeviceBuffer>(r, n));
        out.push_back(std::make_unique<DeviceBuffer>(r, n));
        upload(r, x.back()->p, in.back());
        SPEAR_CUDA_CHECK(cudaMemset(out.back()->p, 0xff, size_t(n) * 2));  // poison: every element must be written
      }
      sync_devices();
      for (int r = 0; r < ranks_; ++r) {
        SPEAR_CUDA_CHECK(cudaSetDevice(r));
        cuda::p2p_allreduce_bf16(x[size_t(r)]->p, out[size_t(r)]->p, n, peers_of(r, ll), r, streams_[size_t(r)]);
      }
      sync_all();
      std::vector<const bf16*> outs;
      for (auto& o : out) outs.push_back(o->p);
      expect_reduced(in, outs, n, ll ? "single call (LL where it fits)" : "single call (flag protocol)");
    }
}

TEST_F(CudaP2pReduce, UnalignedAndInPlace) {
  // Misaligned input and output (element-wise path), then in place (out == x), on a size with a partial vector.
  const int64_t n = 4096 + 4101;
  for (int mode = 0; mode < 4; ++mode) {  // 0, 1: LL; 2, 3: the flag protocol
    const bool ll = mode < 2, misaligned = mode % 2 == 0;
    std::vector<std::vector<uint16_t>> in;
    std::vector<std::unique_ptr<DeviceBuffer>> buf;
    std::vector<const bf16*> outs;
    for (int r = 0; r < ranks_; ++r) {
      in.push_back(random_bf16(n));
      buf.push_back(std::make_unique<DeviceBuffer>(r, 2 * n + 16));
      upload(r, buf.back()->p + (misaligned ? 1 : 0), in.back());
    }
    sync_devices();
    for (int r = 0; r < ranks_; ++r) {
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      bf16* x = buf[size_t(r)]->p + (misaligned ? 1 : 0);
      bf16* out = misaligned ? buf[size_t(r)]->p + n + 11 : x;
      cuda::p2p_allreduce_bf16(x, out, n, peers_of(r, ll), r, streams_[size_t(r)]);
      outs.push_back(out);
    }
    sync_all();
    expect_reduced(
        in, outs, n,
        misaligned ? (ll ? "misaligned, LL" : "misaligned, flags") : (ll ? "in place, LL" : "in place, flags"));
  }
}

// Sizes of the back-to-back calls: varying n changes the number of CTAs (so the per-CTA epochs diverge from the
// call count) and the partial last vector; 524288 takes the flag protocol, the others LL, so the two interleave.
constexpr int64_t kMixedSizes[] = {65536 + 3, 4096, 524288, 1, 20000, 65536 + 3, 8192 + 5};

TEST_F(CudaP2pReduce, BackToBackCallsReuseStaging) {
  constexpr int kCalls = 50;
  std::vector<std::vector<std::vector<uint16_t>>> in(kCalls);  // [call][rank]
  std::vector<std::vector<std::unique_ptr<DeviceBuffer>>> x(kCalls), out(kCalls);
  for (int c = 0; c < kCalls; ++c) {
    const int64_t n = kMixedSizes[c % std::size(kMixedSizes)];
    for (int r = 0; r < ranks_; ++r) {
      in[size_t(c)].push_back(random_bf16(n));
      x[size_t(c)].push_back(std::make_unique<DeviceBuffer>(r, n));
      out[size_t(c)].push_back(std::make_unique<DeviceBuffer>(r, n));
      upload(r, x[size_t(c)].back()->p, in[size_t(c)].back());
    }
  }
  sync_devices();
  // Rank by rank: rank 0 queues all its calls before rank 1 queues any, so the ranks start far apart.
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    for (int c = 0; c < kCalls; ++c) {
      const int64_t n = kMixedSizes[c % std::size(kMixedSizes)];
      cuda::p2p_allreduce_bf16(x[size_t(c)][size_t(r)]->p, out[size_t(c)][size_t(r)]->p, n, peers_[size_t(r)], r,
                               streams_[size_t(r)]);
    }
  }
  sync_all();
  for (int c = 0; c < kCalls; ++c) {
    std::vector<const bf16*> outs;
    for (auto& o : out[size_t(c)]) outs.push_back(o->p);
    expect_reduced(in[size_t(c)], outs, kMixedSizes[c % std::size(kMixedSizes)], "back-to-back call");
  }
}

// fp32 calls (the compensators' partial A·x under tensor parallelism) between bf16 ones: an fp32 call's CTA b
// covers the same staging bytes, flags and epoch as a bf16 call's CTA b, so any interleaving stays in step. Sums
// in rank order in fp32, bit-exact against the CPU.
TEST_F(CudaP2pReduce, Fp32AndBf16CallsInterleave) {
  struct Call {
    bool f32;
    int64_t n;
  };
  const int64_t f32_max = kCapacity / 2;
  const Call calls[] = {{true, 1},          {false, 4096}, {true, 2048},     {true, 2048 + 3},
                        {false, 65536 + 3}, {true, 5000},  {false, 1},       {true, f32_max},
                        {false, kCapacity}, {true, 7},     {true, 4096 + 1}, {false, 20000}};
  constexpr int kRounds = 3;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<std::vector<std::vector<uint16_t>>> in16;         // [call][rank], for the bf16 calls
  std::vector<std::vector<std::vector<float>>> in32;            // [call][rank], for the fp32 calls
  std::vector<std::vector<std::unique_ptr<DeviceBuffer>>> buf;  // [call][rank]: x, then out (fp32: 2 bf16 each)
  const int n_calls = int(std::size(calls)) * kRounds;
  for (int c = 0; c < n_calls; ++c) {
    const Call& call = calls[c % std::size(calls)];
    in16.emplace_back();
    in32.emplace_back();
    buf.emplace_back();
    for (int r = 0; r < ranks_; ++r) {
      const int64_t elems16 = call.f32 ? 2 * call.n : call.n;
      buf.back().push_back(std::make_unique<DeviceBuffer>(r, 2 * elems16));
      bf16* x = buf.back().back()->p;
      if (call.f32) {
        std::vector<float> v(static_cast<size_t>(call.n));
        for (float& f : v) f = nd(rng_);
        SPEAR_CUDA_CHECK(cudaSetDevice(r));
        SPEAR_CUDA_CHECK(cudaMemcpy(x, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
        in32.back().push_back(std::move(v));
      } else {
        in16.back().push_back(random_bf16(call.n));
        upload(r, x, in16.back().back());
      }
      SPEAR_CUDA_CHECK(cudaMemset(x + elems16, 0xff, size_t(elems16) * 2));  // poison the output
    }
  }
  sync_devices();
  // Rank by rank, as in BackToBackCallsReuseStaging: the ranks start far apart.
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    for (int c = 0; c < n_calls; ++c) {
      const Call& call = calls[c % std::size(calls)];
      bf16* x = buf[size_t(c)][size_t(r)]->p;
      if (call.f32) {
        auto* xf = reinterpret_cast<float*>(x);
        cuda::p2p_allreduce_f32(xf, xf + call.n, call.n, peers_[size_t(r)], r, streams_[size_t(r)]);
      } else {
        cuda::p2p_allreduce_bf16(x, x + call.n, call.n, peers_[size_t(r)], r, streams_[size_t(r)]);
      }
    }
  }
  sync_all();
  for (int c = 0; c < n_calls; ++c) {
    const Call& call = calls[c % std::size(calls)];
    if (!call.f32) {
      std::vector<const bf16*> outs;
      for (auto& b : buf[size_t(c)]) outs.push_back(b->p + call.n);
      expect_reduced(in16[size_t(c)], outs, call.n, "bf16 call between fp32 ones");
      continue;
    }
    std::vector<const float*> xs;
    for (const auto& v : in32[size_t(c)]) xs.push_back(v.data());
    std::vector<float> ref(static_cast<size_t>(call.n));
    cuda::p2p_allreduce_reference_f32(xs.data(), ranks_, call.n, ref.data());
    for (int r = 0; r < ranks_; ++r) {
      std::vector<float> got(static_cast<size_t>(call.n));
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      SPEAR_CUDA_CHECK(cudaMemcpy(got.data(), reinterpret_cast<const float*>(buf[size_t(c)][size_t(r)]->p) + call.n,
                                  got.size() * 4, cudaMemcpyDeviceToHost));
      EXPECT_EQ(std::memcmp(got.data(), ref.data(), got.size() * 4), 0)
          << "fp32 call " << c << ", n = " << call.n << ", rank " << r << " differs from the reference";
    }
  }
  // The fp32 capacity is half the bf16 one.
  EXPECT_EQ(cuda::p2p_max_elems(peers_[0], 4), f32_max);
  EXPECT_EQ(cuda::p2p_max_elems(peers_[0], 2), kCapacity);
}

TEST_F(CudaP2pReduce, CudaGraphReplays) {
  constexpr int kCalls = 50, kReplays = 3;
  std::vector<std::vector<std::unique_ptr<DeviceBuffer>>> x(kCalls), out(kCalls);
  for (int c = 0; c < kCalls; ++c) {
    const int64_t n = kMixedSizes[c % std::size(kMixedSizes)];
    for (int r = 0; r < ranks_; ++r) {
      x[size_t(c)].push_back(std::make_unique<DeviceBuffer>(r, n));
      out[size_t(c)].push_back(std::make_unique<DeviceBuffer>(r, n));
    }
  }
  // One graph per device, captured on its stream. The device is set before capture end, instantiation and launch
  // (a graph instantiated on another device than its stream's takes a slow and unsafe fallback path).
  std::vector<cudaGraph_t> graphs(static_cast<size_t>(ranks_));
  std::vector<cudaGraphExec_t> execs(static_cast<size_t>(ranks_));
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    SPEAR_CUDA_CHECK(cudaStreamBeginCapture(streams_[size_t(r)], cudaStreamCaptureModeThreadLocal));
  }
  for (int c = 0; c < kCalls; ++c)
    for (int r = 0; r < ranks_; ++r) {
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      cuda::p2p_allreduce_bf16(x[size_t(c)][size_t(r)]->p, out[size_t(c)][size_t(r)]->p,
                               kMixedSizes[c % std::size(kMixedSizes)], peers_[size_t(r)], r, streams_[size_t(r)]);
    }
  // Every capture ends before any instantiation: a thread-local capture still open on another stream forbids it.
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    SPEAR_CUDA_CHECK(cudaStreamEndCapture(streams_[size_t(r)], &graphs[size_t(r)]));
  }
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    SPEAR_CUDA_CHECK(cudaGraphInstantiate(&execs[size_t(r)], graphs[size_t(r)], 0));
  }
  for (int rep = 0; rep < kReplays; ++rep) {
    std::vector<std::vector<std::vector<uint16_t>>> in(kCalls);
    for (int c = 0; c < kCalls; ++c)
      for (int r = 0; r < ranks_; ++r) {
        in[size_t(c)].push_back(random_bf16(kMixedSizes[c % std::size(kMixedSizes)]));
        upload(r, x[size_t(c)][size_t(r)]->p, in[size_t(c)].back());
        SPEAR_CUDA_CHECK(
            cudaMemset(out[size_t(c)][size_t(r)]->p, 0xff, size_t(kMixedSizes[c % std::size(kMixedSizes)]) * 2));
      }
    sync_devices();
    for (int r = 0; r < ranks_; ++r) {
      SPEAR_CUDA_CHECK(cudaSetDevice(r));
      SPEAR_CUDA_CHECK(cudaGraphLaunch(execs[size_t(r)], streams_[size_t(r)]));
    }
    sync_all();
    for (int c : {kCalls / 2, kCalls - 1}) {
      std::vector<const bf16*> outs;
      for (auto& o : out[size_t(c)]) outs.push_back(o->p);
      expect_reduced(in[size_t(c)], outs, kMixedSizes[c % std::size(kMixedSizes)], "graph replay");
    }
  }
  for (int r = 0; r < ranks_; ++r) {
    SPEAR_CUDA_CHECK(cudaSetDevice(r));
    SPEAR_CUDA_CHECK(cudaGraphExecDestroy(execs[size_t(r)]));
    SPEAR_CUDA_CHECK(cudaGraphDestroy(graphs[size_t(r)]));
  }
}

}  // namespace
}  // namespace spear
