// CUDA decoder kernels (backend/cuda/elementwise.h, attention.h) against the CPU references on random bf16
// inputs. Error measure: ‖out − ref‖ / ‖ref‖ over the whole output, with the reference computed in fp32 from the
// same bf16-rounded inputs; a bf16 output alone costs ~2e-3, so thresholds are 1e-2 unless the kernel is a
// copy or an exact conversion (then bit-exact). Each GPU test skips itself without a device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_pool.h"
#include "backend/cuda/elementwise.h"
#include "core/dtype.h"

namespace spear {

namespace {

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr uint16_t kNanBf16 = 0x7fc0;

// A device array that frees itself.
template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) { SPEAR_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit DevBuf(const std::vector<T>& h) : DevBuf(h.size()) { upload(h); }
  ~DevBuf() { cudaFree(p_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& h) {
    SPEAR_CUDA_CHECK(cudaMemcpy(p_, h.data(), std::min(h.size(), n_) * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    SPEAR_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void fill_bytes(int byte) { SPEAR_CUDA_CHECK(cudaMemset(p_, byte, std::max<size_t>(n_, 1) * sizeof(T))); }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

__nv_bfloat16* bf(const DevBuf<uint16_t>& b) { return reinterpret_cast<__nv_bfloat16*>(b.get()); }

// Random values that are exact in bf16: bits for the GPU, the same values as fp32 for the reference.
struct Bf16Data {
  std::vector<uint16_t> bits;
  std::vector<float> f;
};

Bf16Data random_bf16(size_t n, std::mt19937& rng, float sd = 1.f) {
  std::normal_distribution<float> nd(0.f, sd);
  Bf16Data d;
  d.bits.resize(n);
  d.f.resize(n);
  for (size_t i = 0; i < n; ++i) d.f[i] = bf16_to_f32(d.bits[i] = f32_to_bf16(nd(rng)));
  return d;
}

std::vector<float> to_f32(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bf16_to_f32(bits[i]);
  return f;
}

// ‖got − ref‖ / ‖ref‖, or +inf when got holds a non-finite value (an element never written, or NaN leaking in);
// *bad gets the first such index.
double rel_error(const std::vector<float>& got, const std::vector<float>& ref, size_t* bad = nullptr) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (bad) *bad = i;
      return INFINITY;
    }
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

size_t count_mismatches(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, size_t* first = nullptr) {
  size_t n = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i] && n++ == 0 && first) *first = i;
  return n;
}

}  // namespace

// ---- elementwise -------------------------------------------------------------------------------------------

TEST(CudaKernels, GatherRowsCopiesRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  const int vocab = 517;
  for (int64_t cols : {1, 3, 8, 64, 1000, 4096}) {
    for (int offset : {0, 1}) {  // offset 1: a table at an odd address takes the narrow path
      const int n = 37;
      Bf16Data table = random_bf16(size_t(vocab) * cols + 1, rng);
      std::vector<int32_t> ids(n);
      for (auto& id : ids) id = int32_t(rng() % vocab);
      ids[3] = ids[5];  // repeats are fine
      ids[0] = vocab - 1;
      DevBuf<uint16_t> dt(table.bits), dout(size_t(n) * cols);
      DevBuf<int32_t> did(ids);
      dout.fill_bytes(0xff);
      cuda::gather_rows_bf16(bf(dt) + offset, cols, did.get(), n, bf(dout), nullptr);
      std::vector<uint16_t> got = dout.download(), ref(size_t(n) * cols);
      for (int i = 0; i < n; ++i)
        std::memcpy(&ref[size_t(i) * cols], &table.bits[size_t(ids[i]) * cols + offset], size_t(cols) * 2);
      size_t first = 0;
      EXPECT_EQ(count_mismatches(got, ref, &first), 0u) << "cols " << cols << " offset " << offset << ", first at "
                                                        << first;
    }
  }
}

TEST(CudaKernels, AddMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  for (int64_t n : {1, 7, 8, 4099, 1 << 20}) {
    for (int offset : {0, 1}) {  // offset 1: misaligned views take the scalar path
      Bf16Data x = random_bf16(size_t(n) + 1, rng), y = random_bf16(size_t(n) + 1, rng);
      DevBuf<uint16_t> dx(x.bits), dy(y.bits);
      cuda::add_bf16(bf(dx) + offset, bf(dy) + offset, n, nullptr);
      std::vector<uint16_t> got = dx.download();
      std::vector<uint16_t> ref_bits(x.bits);
      std::vector<float> ref(static_cast<size_t>(n)), gotf(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const float r = x.f[size_t(i + offset)] + y.f[size_t(i + offset)];  // fp32 add, one rounding
        ref[size_t(i)] = r;
        ref_bits[size_t(i + offset)] = f32_to_bf16(r);
        gotf[size_t(i)] = bf16_to_f32(got[size_t(i + offset)]);
      }
      EXPECT_LT(rel_error(gotf, ref), 1e-2) << "n " << n << " offset " << offset;
      // fp32 add + round-to-nearest-even is exact arithmetic: bit-identical to the host, elements outside the
      // range untouched.
      size_t first = 0;
      EXPECT_EQ(count_mismatches(got, ref_bits, &first), 0u) << "n " << n << " offset " << offset << ", first at "
                                                             << first;
    }
  }
}

TEST(CudaKernels, SwigluMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  for (int64_t n : {1, 9, 4096, 14336 * 3 + 5}) {
    for (bool alias : {false, true}) {  // out == gate, as the backend runs it in place
      Bf16Data g = random_bf16(size_t(n), rng, 3.f), u = random_bf16(size_t(n), rng);
      DevBuf<uint16_t> dg(g.bits), du(u.bits), dout(static_cast<size_t>(n));
      dout.fill_bytes(0xff);
      cuda::swiglu_bf16(bf(dg), bf(du), alias ? bf(dg) : bf(dout), n, nullptr);
      std::vector<float> got = to_f32(alias ? dg.download() : dout.download()), ref(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const float gi = g.f[size_t(i)];
        ref[size_t(i)] = gi / (1.f + std::exp(-gi)) * u.f[size_t(i)];
      }
      size_t bad = 0;
      const double err = rel_error(got, ref, &bad);
      EXPECT_LT(err, 1e-2) << "n " << n << " alias " << alias << " (non-finite at " << bad << ")";
    }
  }
}

TEST(CudaKernels, RopeMatchesCpuAtLargePositions) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(14);
  struct Shape {
    int T, n_heads, head_dim;
    float theta;
  };
  // head_dim 6: an odd number of pairs per half (scalar path); 80: non-power-of-two.
  for (Shape s : {Shape{9, 4, 64, 10000.f}, Shape{9, 3, 128, 500000.f}, Shape{9, 2, 80, 10000.f},
                  Shape{9, 2, 6, 10000.f}, Shape{200, 8, 128, 1000000.f}}) {
    std::vector<int32_t> pos(size_t(s.T));
    const int32_t fixed[] = {0, 1, 17, 4095, 70000, 100000, 131071, 99999, 65536};
    for (int t = 0; t < s.T; ++t) pos[size_t(t)] = t < 9 ? fixed[t] : int32_t(rng() % 140000);
    std::vector<float> inv_freq(size_t(s.head_dim / 2));
    for (int i = 0; i < s.head_dim / 2; ++i)
      inv_freq[size_t(i)] = float(1.0 / std::pow(double(s.theta), 2.0 * i / s.head_dim));
    Bf16Data x = random_bf16(size_t(s.T) * s.n_heads * s.head_dim, rng);
    std::vector<float> ref = x.f;
    cpu_rope_f32(ref.data(), s.T, s.n_heads, s.head_dim, pos.data(), inv_freq.data());
    DevBuf<uint16_t> dx(x.bits);
    DevBuf<int32_t> dpos(pos);
    DevBuf<float> dfreq(inv_freq);
    cuda::rope_bf16(bf(dx), s.T, s.n_heads, s.head_dim, dpos.get(), dfreq.get(), nullptr);
    std::vector<float> got = to_f32(dx.download());
    EXPECT_LT(rel_error(got, ref), 1e-2) << "T " << s.T << " heads " << s.n_heads << " head_dim " << s.head_dim;
    // Per token, so that an inaccurate sin/cos at large angles cannot hide in the average.
    const size_t row = size_t(s.n_heads) * s.head_dim;
    for (int t = 0; t < s.T; ++t) {
      std::vector<float> g(got.begin() + t * row, got.begin() + (t + 1) * row);
      std::vector<float> r(ref.begin() + t * row, ref.begin() + (t + 1) * row);
      EXPECT_LT(rel_error(g, r), 1e-2) << "head_dim " << s.head_dim << " token " << t << " at position " << pos[size_t(t)];
    }
  }
}

TEST(CudaKernels, Bf16ConversionsAreExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(15);
  std::normal_distribution<float> nd(0.f, 100.f);
  for (int64_t n : {1, 5, 1024, 100003}) {
    for (int offset : {0, 1}) {
      std::vector<float> x(size_t(n) + 1);
      for (auto& v : x) v = nd(rng);
      if (n > 8) {  // special values (no NaN: its payload is not part of the contract)
        x[1] = INFINITY;
        x[2] = -INFINITY;
        x[3] = 1e-40f;  // denormal
        x[4] = 3.4e38f;     // finite in fp32, rounds to inf in bf16
        x[5] = -0.f;
        x[6] = 1.00390625f;  // exactly half-way between two bf16 values: ties to even
      }
      DevBuf<float> dx(x);
      DevBuf<uint16_t> db(size_t(n) + 1);
      db.fill_bytes(0);
      cuda::f32_to_bf16(dx.get() + offset, bf(db) + offset, n, nullptr);
      std::vector<uint16_t> got = db.download(), ref(size_t(n) + 1, 0);
      for (int64_t i = 0; i < n; ++i) ref[size_t(i + offset)] = f32_to_bf16(x[size_t(i + offset)]);
      size_t first = 0;
      EXPECT_EQ(count_mismatches(got, ref, &first), 0u) << "f32_to_bf16 n " << n << " offset " << offset
                                                        << ", first at " << first;

      DevBuf<float> dback(size_t(n) + 1);
      dback.fill_bytes(0);
      cuda::bf16_to_f32(bf(db) + offset, dback.get() + offset, n, nullptr);
      std::vector<float> back = dback.download();
      size_t bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float want = bf16_to_f32(ref[size_t(i + offset)]);
        if (std::memcmp(&want, &back[size_t(i + offset)], 4) != 0 && bad++ == 0)
          ADD_FAILURE() << "bf16_to_f32 n " << n << " offset " << offset << " element " << i << ": " << back[size_t(i + offset)]
                        << " != " << want;
      }
    }
  }
}

TEST(CudaKernels, ArgmaxRowsTakesFirstMaximum) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(16);
  std::normal_distribution<float> nd(0.f, 5.f);
  struct Shape {
    int rows, cols;
  };
  for (Shape s : {Shape{1, 1}, Shape{3, 3}, Shape{5, 1000}, Shape{2, 4097}, Shape{256, 32000}, Shape{3, 151936},
                  Shape{2, 262144}}) {
    std::vector<float> x(size_t(s.rows) * s.cols);
    for (auto& v : x) v = nd(rng);
    for (int r = 0; r < s.rows; ++r) {
      float* row = x.data() + size_t(r) * s.cols;
      if (s.cols >= 2 && r % 3 == 1) {  // a tie between two maxima: the lower index wins
        int j1 = int(rng() % s.cols), j2 = int(rng() % s.cols);
        if (j1 == j2) j2 = (j1 + 1) % s.cols;
        row[j1] = row[j2] = 100.f;
      } else if (r % 3 == 2) {  // all equal: index 0
        std::fill(row, row + s.cols, -3.f);
      }
    }
    DevBuf<float> dx(x);
    DevBuf<int32_t> dout(size_t(s.rows));
    dout.fill_bytes(0xff);
    cuda::argmax_rows_f32(dx.get(), s.rows, s.cols, dout.get(), nullptr);
    std::vector<int32_t> got = dout.download();
    for (int r = 0; r < s.rows; ++r) {
      const float* row = x.data() + size_t(r) * s.cols;
      const int32_t want = int32_t(std::max_element(row, row + s.cols) - row);
      EXPECT_EQ(got[size_t(r)], want) << s.rows << "x" << s.cols << " row " << r;
    }
  }
}

// ---- attention ---------------------------------------------------------------------------------------------

namespace {

// A paged bf16 KV cache for one layer on the GPU and the same contents in a CpuKvCache. Pages come from a
// shuffled pool larger than needed, so a slot's pages are scattered and out of order; unallocated table
// entries are -1 and every pool element that no position owns is NaN, so reading a key that does not exist
// (past a sequence's length, on an unallocated page) poisons the output and fails the test.
class PagedCache {
 public:
  PagedCache(int n_slots, int max_tokens, int kv_dim, const std::vector<int>& slot_tokens, std::mt19937& rng)
      : n_slots_(n_slots),
        max_blocks_((max_tokens + cuda::kBlockTokens - 1) / cuda::kBlockTokens),
        kv_dim_(kv_dim),
        cpu_(1, n_slots, max_blocks_ * cuda::kBlockTokens, kv_dim) {
    int needed = 0;
    for (int t : slot_tokens) needed += (t + cuda::kBlockTokens - 1) / cuda::kBlockTokens;
    num_blocks_ = needed + 7;
    std::vector<int32_t> pool(static_cast<size_t>(num_blocks_));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    table_.assign(size_t(n_slots) * max_blocks_, -1);
    size_t next = 0;
    for (int s = 0; s < n_slots; ++s)
      for (int j = 0; j < (slot_tokens[size_t(s)] + cuda::kBlockTokens - 1) / cuda::kBlockTokens; ++j)
        table_[size_t(s) * max_blocks_ + j] = pool[next++];
    k_host_.assign(size_t(num_blocks_) * cuda::kBlockTokens * kv_dim, kNanBf16);
    v_host_ = k_host_;
    k_ = std::make_unique<DevBuf<uint16_t>>(k_host_.size());
    v_ = std::make_unique<DevBuf<uint16_t>>(v_host_.size());
    bt_ = std::make_unique<DevBuf<int32_t>>(table_);
  }

  size_t offset(int slot, int pos) const {
    const int32_t blk = table_.at(size_t(slot) * max_blocks_ + pos / cuda::kBlockTokens);
    if (blk < 0) ADD_FAILURE() << "test bug: slot " << slot << " position " << pos << " has no page";
    return (size_t(blk) * cuda::kBlockTokens + pos % cuda::kBlockTokens) * kv_dim_;
  }
  // One position's key and value (bf16 bits) in both caches; upload() sends the pool to the GPU.
  void set_row(int slot, int pos, const uint16_t* k, const uint16_t* v) {
    std::copy(k, k + kv_dim_, k_host_.begin() + offset(slot, pos));
    std::copy(v, v + kv_dim_, v_host_.begin() + offset(slot, pos));
    for (int i = 0; i < kv_dim_; ++i) {
      cpu_.k(0, slot)[size_t(pos) * kv_dim_ + i] = bf16_to_f32(k[i]);
      cpu_.v(0, slot)[size_t(pos) * kv_dim_ + i] = bf16_to_f32(v[i]);
    }
  }
  void upload() {
    k_->upload(k_host_);
    v_->upload(v_host_);
  }
  cuda::PagedKvLayer layer() const {
    cuda::PagedKvLayer l;
    l.k = bf(*k_);
    l.v = bf(*v_);
    l.block_table = bt_->get();
    l.max_blocks = max_blocks_;
    l.kv_dim = kv_dim_;
    return l;
  }
  int max_blocks() const { return max_blocks_; }
  int n_slots() const { return n_slots_; }
  CpuKvCache& cpu() { return cpu_; }
  std::vector<uint16_t> download_k() const { return k_->download(); }
  std::vector<uint16_t> download_v() const { return v_->download(); }

 private:
  int n_slots_, max_blocks_, kv_dim_, num_blocks_ = 0;
  CpuKvCache cpu_;
  std::vector<int32_t> table_;
  std::vector<uint16_t> k_host_, v_host_;
  std::unique_ptr<DevBuf<uint16_t>> k_, v_;
  std::unique_ptr<DevBuf<int32_t>> bt_;
};

struct SeqSpec {
  int pos0, n_tokens;  // tokens already in the cache, new tokens of this step
};

struct AttnCase {
  int n_kv_heads, group, head_dim, window;
  std::vector<SeqSpec> seqs;
  bool decode;
  bool workspace;  // decode: run the split (flash-decoding) path with a workspace
};

std::string describe(const AttnCase& c) {
  std::ostringstream os;
  os << (c.decode ? "decode" : "prefill") << (c.decode ? (c.workspace ? " +workspace" : " no-workspace") : "")
     << " kv_heads=" << c.n_kv_heads << " group=" << c.group << " head_dim=" << c.head_dim << " window=" << c.window
     << " seqs(pos0+new)=";
  for (const SeqSpec& s : c.seqs) os << s.pos0 << "+" << s.n_tokens << " ";
  return os.str();
}

// Appends the step's K/V with kv_append_bf16, runs attention_bf16 and compares with CpuBackend::attention on
// the same bf16 values; also checks that the appended rows landed on the right pages.
void run_attention_case(const AttnCase& c, std::mt19937& rng) {
  SCOPED_TRACE(describe(c));
  const int n_seqs = int(c.seqs.size());
  const int hd = c.head_dim, n_heads = c.n_kv_heads * c.group, kv_dim = c.n_kv_heads * hd, q_dim = n_heads * hd;
  const int n_slots = n_seqs + 2;
  // Sequence i lives in slot n_slots - 1 - i (slots and batch order differ).
  std::vector<int> slot_tokens(size_t(n_slots), 0);
  int max_len = 1, T = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const int len = c.seqs[size_t(i)].pos0 + c.seqs[size_t(i)].n_tokens;
    slot_tokens[size_t(n_slots - 1 - i)] = len;
    max_len = std::max(max_len, len);
    T += c.seqs[size_t(i)].n_tokens;
  }
  std::vector<SeqSlice> slices;
  std::vector<cuda::DevSeq> dev_seqs;
  std::vector<int32_t> token_seq;
  for (int i = 0, tb = 0; i < n_seqs; ++i) {
    const SeqSpec& s = c.seqs[size_t(i)];
    slices.push_back({tb, s.n_tokens, s.pos0, n_slots - 1 - i});
    dev_seqs.push_back({tb, s.n_tokens, s.pos0, n_slots - 1 - i});
    for (int j = 0; j < s.n_tokens; ++j) token_seq.push_back(i);
    tb += s.n_tokens;
  }

  PagedCache cache(n_slots, max_len + 40, kv_dim, slot_tokens, rng);
  for (int i = 0; i < n_seqs; ++i)
    for (int p = 0; p < c.seqs[size_t(i)].pos0; ++p) {
      Bf16Data k = random_bf16(size_t(kv_dim), rng), v = random_bf16(size_t(kv_dim), rng);
      cache.set_row(n_slots - 1 - i, p, k.bits.data(), v.bits.data());
    }
  cache.upload();

  Bf16Data q = random_bf16(size_t(T) * q_dim, rng, 2.f);
  Bf16Data k = random_bf16(size_t(T) * kv_dim, rng), v = random_bf16(size_t(T) * kv_dim, rng);

  // CPU reference (appends k, v to its own cache).
  CpuBackend cpu;
  Tensor tq = cpu.upload(q.f.data(), T, q_dim), tk = cpu.upload(k.f.data(), T, kv_dim),
         tv = cpu.upload(v.f.data(), T, kv_dim), tout = cpu.alloc(T, q_dim);
  AttentionParams params;
  params.layer = 0;
  params.n_heads = n_heads;
  params.n_kv_heads = c.n_kv_heads;
  params.head_dim = hd;
  params.window = c.window;
  params.scale = 1.f / std::sqrt(float(hd));
  cpu.attention(tq, tk, tv, slices, cache.cpu(), params, tout);
  std::vector<float> ref(size_t(T) * q_dim);
  cpu.download(tout, ref.data());

  DevBuf<uint16_t> dq(q.bits), dk(k.bits), dv(v.bits), dout(size_t(T) * q_dim);
  DevBuf<int32_t> dtok(token_seq);
  DevBuf<cuda::DevSeq> dseqs(dev_seqs);
  dout.fill_bytes(0xff);  // poison: every element must be written
  const cuda::PagedKvLayer layer = cache.layer();
  cuda::kv_append_bf16(bf(dk), bf(dv), T, dtok.get(), dseqs.get(), layer, nullptr);
  cuda::AttnShape shape;
  shape.n_heads = n_heads;
  shape.n_kv_heads = c.n_kv_heads;
  shape.head_dim = hd;
  shape.window = c.window;
  shape.scale = params.scale;
  if (c.decode && c.workspace) {
    const size_t ws_bytes = cuda::attention_workspace_bytes(T, n_heads, hd, layer.max_blocks);
    DevBuf<uint8_t> ws(ws_bytes);
    ws.fill_bytes(0xff);  // NaN: only what a split wrote may be read
    SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, cuda::attention_workspace_zero_bytes()));  // the arrival counters
    cuda::attention_bf16(bf(dq), T, dtok.get(), dseqs.get(), n_seqs, layer, shape, max_len, true, bf(dout), ws.get(),
                         ws_bytes, nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
    // The splits' last arrivals put their counters back to zero (the next launch reuses them).
    const std::vector<uint8_t> wsh = ws.download();
    EXPECT_TRUE(std::all_of(wsh.begin(), wsh.begin() + cuda::attention_workspace_zero_bytes(),
                            [](uint8_t b) { return b == 0; }))
        << "split arrival counters left non-zero";
  } else {
    cuda::attention_bf16(bf(dq), T, dtok.get(), dseqs.get(), n_seqs, layer, shape, max_len, c.decode, bf(dout),
                         nullptr);
    SPEAR_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<float> got = to_f32(dout.download());

  // The appended rows are where the page table says.
  const std::vector<uint16_t> pk = cache.download_k(), pv = cache.download_v();
  size_t wrong_rows = 0;
  for (int t = 0; t < T; ++t) {
    const SeqSlice& s = slices[size_t(token_seq[size_t(t)])];
    const size_t off = cache.offset(s.kv_slot, s.pos0 + t - s.token_begin);
    if (!std::equal(pk.begin() + off, pk.begin() + off + kv_dim, k.bits.begin() + size_t(t) * kv_dim) ||
        !std::equal(pv.begin() + off, pv.begin() + off + kv_dim, v.bits.begin() + size_t(t) * kv_dim))
      ++wrong_rows;
  }
  EXPECT_EQ(wrong_rows, 0u) << "kv_append_bf16 wrote " << wrong_rows << " of " << T << " rows wrongly";

  size_t bad = 0;
  const double err = rel_error(got, ref, &bad);
  EXPECT_LT(err, 1e-2) << (std::isfinite(err) ? "" : "non-finite output at token " + std::to_string(bad / q_dim) +
                                                         " head " + std::to_string(bad % q_dim / hd));
  // Per token too: one wrong short sequence must not hide behind a long one.
  for (int t = 0; t < T; ++t) {
    std::vector<float> g(got.begin() + size_t(t) * q_dim, got.begin() + size_t(t + 1) * q_dim);
    std::vector<float> r(ref.begin() + size_t(t) * q_dim, ref.begin() + size_t(t + 1) * q_dim);
    const double e = rel_error(g, r);
    if (!(e < 2e-2)) {
      ADD_FAILURE() << "token " << t << " (sequence " << token_seq[size_t(t)] << "): relative error " << e;
      break;
    }
  }
}

// Sequences of one new token each, at the given context lengths.
std::vector<SeqSpec> decode_seqs(std::initializer_list<int> lengths) {
  std::vector<SeqSpec> s;
  for (int p : lengths) s.push_back({p, 1});
  return s;
}

}  // namespace

TEST(CudaAttention, PrefillMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  // Several sequences, some continuing an existing cache (pos0 > 0), one-token sequences mixed in.
  const std::vector<SeqSpec> mixed = {{0, 37}, {100, 64}, {550, 50}, {5, 1}, {0, 1}, {16, 16}, {300, 129}};
  for (int window : {0, 37}) {
    for (int group : {1, 4, 8}) {
      for (int hd : {64, 128}) run_attention_case({2, group, hd, window, mixed, false, false}, rng);
    }
    run_attention_case({1, 4, 128, window, {{0, 600}}, false, false}, rng);  // one long prompt
  }
  // Other head dims (padded kernels; 36 and 6 are not multiples of 8: 4-byte loads) and groups over 16.
  run_attention_case({2, 2, 80, 0, mixed, false, false}, rng);
  run_attention_case({1, 2, 256, 37, mixed, false, false}, rng);
  run_attention_case({2, 3, 36, 0, mixed, false, false}, rng);
  run_attention_case({2, 2, 6, 37, {{3, 20}, {0, 70}}, false, false}, rng);
  run_attention_case({1, 20, 64, 0, mixed, false, false}, rng);
}

TEST(CudaAttention, DecodeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  // Lengths around page (16) and tile (64) boundaries, and one long context (many splits).
  const std::vector<SeqSpec> seqs = decode_seqs({0, 1, 15, 16, 63, 64, 255, 256, 599, 2999});
  for (bool ws : {true, false}) {
    for (int window : {0, 37}) {
      for (int group : {1, 4, 8}) {
        for (int hd : {64, 128}) run_attention_case({2, group, hd, window, seqs, true, ws}, rng);
      }
    }
    run_attention_case({1, 8, 128, 0, decode_seqs({4000}), true, ws}, rng);  // batch 1: the split fills the GPU
    run_attention_case({2, 2, 80, 0, seqs, true, ws}, rng);
    run_attention_case({1, 2, 256, 37, seqs, true, ws}, rng);
    run_attention_case({2, 3, 36, 0, seqs, true, ws}, rng);
    run_attention_case({1, 20, 64, 0, seqs, true, ws}, rng);  // group > 16: two CTAs per KV head
  }
}

// A decode step (append + attention) captured once in a CUDA graph and replayed while the contexts grow: only
// the device arrays (q, k, v, seqs) change between replays, so the split plan must come from the device.
TEST(CudaAttention, DecodeGraphReplayWithGrowingContexts) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  for (int window : {0, 37}) {
    SCOPED_TRACE("window " + std::to_string(window));
    const int n_kv = 2, group = 4, hd = 128, n_heads = n_kv * group, kv_dim = n_kv * hd, q_dim = n_heads * hd;
    const std::vector<int> start = {0, 40, 250, 1000};  // crosses 64-key tiles and split boundaries as it grows
    const int steps = 60, T = int(start.size()), n_slots = T;
    std::vector<int> slot_tokens;
    for (int s : start) slot_tokens.push_back(s + steps);
    PagedCache cache(n_slots, 1000 + steps + 16, kv_dim, slot_tokens, rng);
    for (int i = 0; i < T; ++i)
      for (int p = 0; p < start[size_t(i)]; ++p) {
        Bf16Data k = random_bf16(size_t(kv_dim), rng), v = random_bf16(size_t(kv_dim), rng);
        cache.set_row(i, p, k.bits.data(), v.bits.data());
      }
    cache.upload();

    DevBuf<uint16_t> dq(size_t(T) * q_dim), dk(size_t(T) * kv_dim), dv(size_t(T) * kv_dim), dout(size_t(T) * q_dim);
    std::vector<int32_t> token_seq(static_cast<size_t>(T));
    std::iota(token_seq.begin(), token_seq.end(), 0);
    DevBuf<int32_t> dtok(token_seq);
    std::vector<cuda::DevSeq> dev_seqs(static_cast<size_t>(T));
    std::vector<SeqSlice> slices(static_cast<size_t>(T));
    for (int i = 0; i < T; ++i) {
      dev_seqs[size_t(i)] = {i, 1, start[size_t(i)], i};
      slices[size_t(i)] = {i, 1, start[size_t(i)], i};
    }
    DevBuf<cuda::DevSeq> dseqs(dev_seqs);
    const cuda::PagedKvLayer layer = cache.layer();
    cuda::AttnShape shape;
    shape.n_heads = n_heads;
    shape.n_kv_heads = n_kv;
    shape.head_dim = hd;
    shape.window = window;
    shape.scale = 1.f / std::sqrt(float(hd));
    const size_t ws_bytes = cuda::attention_workspace_bytes(T, n_heads, hd, layer.max_blocks);
    DevBuf<uint8_t> ws(ws_bytes);
    SPEAR_CUDA_CHECK(cudaMemset(ws.get(), 0, cuda::attention_workspace_zero_bytes()));

    cudaStream_t stream;  // a blocking stream: the uploads below (legacy stream) are ordered before each replay
    SPEAR_CUDA_CHECK(cudaStreamCreate(&stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    SPEAR_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    cuda::kv_append_bf16(bf(dk), bf(dv), T, dtok.get(), dseqs.get(), layer, stream);
    cuda::attention_bf16(bf(dq), T, dtok.get(), dseqs.get(), T, layer, shape, /*max_ctx=*/1, true, bf(dout), ws.get(),
                         ws_bytes, stream);
    SPEAR_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    SPEAR_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

    CpuBackend cpu;
    AttentionParams params;
    params.n_heads = n_heads;
    params.n_kv_heads = n_kv;
    params.head_dim = hd;
    params.window = window;
    params.scale = shape.scale;
    double worst = 0;
    int worst_step = -1;
    for (int step = 0; step < steps; ++step) {
      Bf16Data q = random_bf16(size_t(T) * q_dim, rng, 2.f);
      Bf16Data k = random_bf16(size_t(T) * kv_dim, rng), v = random_bf16(size_t(T) * kv_dim, rng);
      for (int i = 0; i < T; ++i) dev_seqs[size_t(i)].pos0 = slices[size_t(i)].pos0 = start[size_t(i)] + step;
      dq.upload(q.bits);
      dk.upload(k.bits);
      dv.upload(v.bits);
      dseqs.upload(dev_seqs);
      dout.fill_bytes(0xff);
      SPEAR_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
      std::vector<float> got = to_f32(dout.download());

      Tensor tq = cpu.upload(q.f.data(), T, q_dim), tk = cpu.upload(k.f.data(), T, kv_dim),
             tv = cpu.upload(v.f.data(), T, kv_dim), tout = cpu.alloc(T, q_dim);
      cpu.attention(tq, tk, tv, slices, cache.cpu(), params, tout);
      std::vector<float> ref(size_t(T) * q_dim);
      cpu.download(tout, ref.data());
      const double err = rel_error(got, ref);
      if (!(err <= worst)) {
        worst = err;
        worst_step = step;
      }
    }
    EXPECT_LT(worst, 1e-2) << "worst relative error at replay " << worst_step;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

// The activation pool: a freed block serves a later request of its class or of a class up to half its size (so a
// new, smaller iteration size costs no cudaMalloc), never a request more than half smaller, and goes back to its own
// class.
TEST(CudaDevicePool, ReusesFreeBlocksUpToTwiceTheClass) {
  SKIP_WITHOUT_GPU();
  auto pool = std::make_shared<cuda::DevicePool>();
  const size_t mib = size_t(1) << 20;
  void* big = nullptr;
  {
    auto b = pool->alloc(8 * mib);
    big = b.get();
  }
  EXPECT_EQ(pool->mallocs(), 1u);
  {
    auto a = pool->alloc(5 * mib);  // class 5 MiB: the free 8 MiB block (<= 10 MiB) serves it
    EXPECT_EQ(a.get(), big);
    EXPECT_EQ(pool->mallocs(), 1u);
    auto c = pool->alloc(5 * mib);  // the 8 MiB block is taken: a new one
    EXPECT_NE(c.get(), big);
    EXPECT_EQ(pool->mallocs(), 2u);
  }
  {
    auto d = pool->alloc(2 * mib);  // 2 × 2 MiB < 5 MiB and 8 MiB: no free block fits
    EXPECT_EQ(pool->mallocs(), 3u);
  }
  {
    auto e = pool->alloc(8 * mib);  // the 8 MiB block went back to its own class
    EXPECT_EQ(e.get(), big);
  }
  EXPECT_EQ(pool->mallocs(), 3u);
  EXPECT_EQ(pool->reserved_bytes(), 15 * mib);
}

}  // namespace spear
