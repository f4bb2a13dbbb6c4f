#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/mlp_fused.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>

#include <cuda_bf16.h>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/bias.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dense_gemv.h"
#include "backend/cuda/ec_naive.h"
#include "backend/cuda/swiglu_ec.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/nccl_loader.h"
#include "backend/cuda/rms_norm.h"
#include "backend/cuda/rope_kv_append.h"
#include "core/dtype.h"
#include "core/error.h"
#include "spear/compensator.h"

namespace spear::cuda {

// ---- DeviceBuffer

DeviceBuffer::DeviceBuffer(size_t bytes) : n_(bytes) {
  if (bytes == 0) return;
  if (cudaMalloc(&p_, bytes) != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("out of GPU memory: could not allocate {:.1f} MiB ({:.1f} MiB free of {:.1f} MiB)", double(bytes) / (1 << 20),
         double(free_b) / (1 << 20), double(total_b) / (1 << 20));
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (p_) cudaFree(p_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) cudaFree(p_);
    p_ = o.p_;
    n_ = o.n_;
    o.p_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

namespace {

std::vector<uint16_t> to_bf16(const float* x, size_t n) {
  std::vector<uint16_t> out(n);
#pragma omp parallel for schedule(static) if (n > (1u << 20))
  for (size_t i = 0; i < n; ++i) out[i] = spear::f32_to_bf16(x[i]);
  return out;
}

DeviceBuffer upload_bytes(const void* host, size_t bytes) {
  DeviceBuffer b(bytes);
  if (bytes) SPEAR_CUDA_CHECK(cudaMemcpy(b.get(), host, bytes, cudaMemcpyHostToDevice));
  return b;
}

DeviceBuffer upload_bf16(const float* v, size_t n) {
  if (n == 0) return {};
  auto h = to_bf16(v, n);
  return upload_bytes(h.data(), h.size() * 2);
}

DeviceBuffer upload_bf16(const std::vector<float>& v) { return upload_bf16(v.data(), v.size()); }

__nv_bfloat16* bf(const Tensor& t) { return static_cast<__nv_bfloat16*>(t.data); }

void check_bf16(const Tensor& t, const char* what) {
  SPEAR_CHECK(t.device == Device::CUDA && t.dtype == DType::BF16, "cuda backend: {} must be a bf16 GPU tensor", what);
}

std::atomic<uint64_t> g_cache_ids{1};

// An integer in [lo, hi] from the environment, or `dflt` when unset; fails on anything else.
int64_t env_int64(const char* name, int64_t dflt, int64_t lo, int64_t hi) {
  const char* e = std::getenv(name);
  if (!e || !*e) return dflt;
  const std::string_view s(e);
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi)
    fail("{}={}: expected an integer in [{}, {}]", name, s, lo, hi);
  return v;
}

}  // namespace

// ---- KV cache

CudaKvCache::CudaKvCache(int n_layers, int n_slots, int max_tokens, int kv_dim)
    : n_layers_(n_layers), n_slots_(n_slots), max_tokens_(max_tokens), kv_dim_(kv_dim),
      max_blocks_((max_tokens + kBlockTokens - 1) / kBlockTokens), n_blocks_(size_t(n_slots) * max_blocks_),
      id_(g_cache_ids++) {
  pool_ = DeviceBuffer(size_t(n_layers) * 2 * n_blocks_ * kBlockTokens * kv_dim * sizeof(__nv_bfloat16));
  table_ = DeviceBuffer(size_t(n_slots) * max_blocks_ * sizeof(int32_t));
  host_table_.assign(size_t(n_slots) * max_blocks_, -1);
  slot_blocks_.assign(size_t(n_slots), 0);
  // Hand out low block numbers first (pop from the back).
  for (size_t b = n_blocks_; b-- > 0;) free_.push_back(int32_t(b));
  SPEAR_CUDA_CHECK(cudaMemcpy(table_.get(), host_table_.data(), table_.bytes(), cudaMemcpyHostToDevice));
}

void CudaKvCache::ensure(int slot, int n_tokens) {
  const int need = (n_tokens + kBlockTokens - 1) / kBlockTokens;
  int& have = slot_blocks_[size_t(slot)];
  while (have < need) {
    if (free_.empty()) fail("KV cache out of blocks (slot {}, {} tokens)", slot, n_tokens);
    host_table_[size_t(slot) * max_blocks_ + have] = free_.back();
    free_.pop_back();
    ++have;
    dirty_ = true;
  }
}

void CudaKvCache::upload_table_if_dirty(cudaStream_t stream) {
  if (!dirty_) return;
  SPEAR_CUDA_CHECK(cudaMemcpyAsync(table_.get(), host_table_.data(), table_.bytes(), cudaMemcpyHostToDevice, stream));
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));  // host_table_ may change before a later copy
  dirty_ = false;
}

PagedKvLayer CudaKvCache::layer(int l) const {
  PagedKvLayer p;
  const size_t per = n_blocks_ * kBlockTokens * size_t(kv_dim_);
  auto* base = pool_.as<__nv_bfloat16>() + size_t(l) * 2 * per;
  p.k = base;
  p.v = base + per;
  p.block_table = table_.as<int32_t>();
  p.max_blocks = max_blocks_;
  p.kv_dim = kv_dim_;
  return p;
}

// ---- backend

CudaBackend::CudaBackend(int device) : device_(device) {
  if (device_count() <= device) fail("--device cuda: no CUDA device {} (found {})", device, device_count());
  SPEAR_CUDA_CHECK(cudaSetDevice(device));
  sm_count_ = device_info(device).sm_count;
  l2_bytes_ = device_info(device).l2_bytes;
  if (const char* e = std::getenv("SPEAR_W4_TUNE")) tune_w4_ = std::string(e) != "0";
  if (const char* e = std::getenv("SPEAR_W4_DEQUANT_MIN_M")) w4_dequant_min_m_ = std::atoi(e);
  if (const char* e = std::getenv("SPEAR_FUSED_MLP")) fused_mlp_on_ = std::string(e) == "1";
  if (const char* e = std::getenv("SPEAR_EC_DEFER")) ec_defer_ = std::string(e) != "0", ec_defer_groups_ = *e == '2';
  ec_defer_min_m_ = int(env_int64("SPEAR_EC_DEFER_MIN_M", ec_defer_min_m_, 1, 32));
  ec_swiglu_max_m_ = int(env_int64("SPEAR_EC_SWIGLU", ec_swiglu_max_m_, 0, kSwigluEcMaxTokens));
  if (const char* e = std::getenv("SPEAR_ROPE_ATTN")) rope_attn_on_ = std::string(e) != "0";
  if (const char* e = std::getenv("SPEAR_W4_TUNE_FUSED")) tune_fused_ = std::string(e) != "0";
  if (const char* e = std::getenv("SPEAR_W4_TUNE_AFTER")) tune_after_ = std::string(e) != "0";
  decode_fusion_mask_ = int(env_int64("SPEAR_DECODE_FUSION", decode_fusion_mask_, 0, 7));
  decode_fusion_max_m_ = int(env_int64("SPEAR_DECODE_FUSION_MAX_M", decode_fusion_max_m_, 1, 8));
  gemv_max_m_ = int(env_int64("SPEAR_GEMV_MAX_M", gemv_max_m_, 0, kDenseGemvMaxM));
  if (const char* e = std::getenv("SPEAR_TP_REDUCE"); e && *e) tp_reduce_ = parse_tp_reduce(e, "SPEAR_TP_REDUCE");
  p2p_capacity_ = env_int64("SPEAR_TP_P2P_CAPACITY", p2p_capacity_, 1, int64_t(1) << 30);
  p2p_timeout_ns_ = uint64_t(env_int64("SPEAR_TP_P2P_TIMEOUT_MS", 0, 0, int64_t(1) << 40)) * 1'000'000ull;
  tail_max_h_ = int(env_int64("SPEAR_TP_TAIL_MAX_H", tail_max_h_, 1, int64_t(1) << 20));
  if (const char* e = std::getenv("SPEAR_TP_GEMM_PUSH")) gemm_push_ = std::string(e) != "0";
  if (const char* e = std::getenv("SPEAR_PREFILL_GRAPHS")) prefill_graphs_ = std::string(e) != "0";
  prefill_graph_cap_ = int(env_int64("SPEAR_PREFILL_GRAPH_CAP", prefill_graph_cap_, 0, 4096));
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  SPEAR_CUBLAS_CHECK(cublasCreate(&cublas_));
  SPEAR_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // A fixed workspace: cuBLAS then allocates nothing while a graph is being captured.
  cublas_ws_ = DeviceBuffer(size_t(32) << 20);
  SPEAR_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_ws_.get(), cublas_ws_.bytes()));
  SPEAR_CUDA_CHECK(cudaStreamCreateWithFlags(&ec_stream_, cudaStreamNonBlocking));
  SPEAR_CUBLAS_CHECK(cublasCreate(&cublas_ec_));
  SPEAR_CUBLAS_CHECK(cublasSetStream(cublas_ec_, ec_stream_));
  cublas_ec_ws_ = DeviceBuffer(size_t(4) << 20);
  SPEAR_CUBLAS_CHECK(cublasSetWorkspace(cublas_ec_, cublas_ec_ws_.get(), cublas_ec_ws_.bytes()));
  SPEAR_CUDA_CHECK(cudaEventCreateWithFlags(&ev_fork_, cudaEventDisableTiming));
  SPEAR_CUDA_CHECK(cudaEventCreateWithFlags(&ev_join_, cudaEventDisableTiming));
  pool_ = std::make_shared<DevicePool>();
  prof_ = std::make_unique<OpProfiler>(stream_);
}

CudaBackend::~CudaBackend() {
  prof_.reset();  // prints its table when profiling
  teardown_tp();  // graphs, then the streams' work, then the P2P buffers and the communicator
  if (batch_host_) cudaFreeHost(batch_host_);
  if (cublas_) cublasDestroy(cublas_);
  if (cublas_ec_) cublasDestroy(cublas_ec_);
  if (ev_fork_) cudaEventDestroy(ev_fork_);
  if (ev_join_) cudaEventDestroy(ev_join_);
  if (ec_stream_) cudaStreamDestroy(ec_stream_);
  if (stream_) cudaStreamDestroy(stream_);
}

Tensor CudaBackend::alloc(int64_t rows, int64_t cols) {
  Tensor t;
  t.storage = pool_->alloc(size_t(rows * cols) * 2);
  t.data = t.storage.get();
  t.dtype = DType::BF16;
  t.device = Device::CUDA;
  t.rows = rows;
  t.cols = cols;
  return t;
}

Tensor CudaBackend::alloc_f32(int64_t rows, int64_t cols) {
  Tensor t = alloc(rows, cols * 2);  // same bytes
  t.dtype = DType::F32;
  t.cols = cols;
  return t;
}

Tensor CudaBackend::alloc_ids(int64_t rows) {
  Tensor t = alloc(rows, 2);
  t.dtype = DType::I32;
  t.cols = 1;
  return t;
}

Tensor CudaBackend::upload(const float* host, int64_t rows, int64_t cols) {
  // Persistent (weights, norms): its own allocation, not the activation pool.
  auto buf = std::make_shared<DeviceBuffer>(upload_bf16(host, size_t(rows * cols)));
  Tensor t;
  t.storage = std::shared_ptr<void>(buf, buf->get());
  t.data = buf->get();
  t.dtype = DType::BF16;
  t.device = Device::CUDA;
  t.rows = rows;
  t.cols = cols;
  return t;
}

void CudaBackend::download(const Tensor& t, float* host) {
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (t.dtype == DType::F32) {
    SPEAR_CUDA_CHECK(cudaMemcpy(host, t.data, t.nbytes(), cudaMemcpyDeviceToHost));
    return;
  }
  check_bf16(t, "download");
  std::vector<uint16_t> h(size_t(t.numel()));
  SPEAR_CUDA_CHECK(cudaMemcpy(h.data(), t.data, h.size() * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < h.size(); ++i) host[i] = spear::bf16_to_f32(h[i]);
}

void CudaBackend::download_i32(const Tensor& t, int32_t* host) {
  SPEAR_CHECK(t.dtype == DType::I32, "download_i32: tensor is not I32");
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  SPEAR_CUDA_CHECK(cudaMemcpy(host, t.data, size_t(t.rows) * 4, cudaMemcpyDeviceToHost));
}

void CudaBackend::begin_batch(const BatchDesc& d, KvCache& cache) {
  const auto t0 = std::chrono::steady_clock::now();
  auto* kv = dynamic_cast<CudaKvCache*>(&cache);
  SPEAR_CHECK(kv, "cuda backend: the KV cache was not made by this backend");
  const size_t T = d.tokens.size(), S = d.seqs.size();
  // The staging holds 8 · cap_t ints (layout below): cap_t must cover the tokens and the sequences.
  const size_t need_t = std::max(T, S);
  if (need_t > batch_cap_ / 8) {
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (batch_host_) cudaFreeHost(batch_host_);
    batch_cap_ = std::max<size_t>(8 * 2 * need_t, 4096);
    SPEAR_CUDA_CHECK(cudaMallocHost(&batch_host_, batch_cap_ * 4));
    batch_dev_ = DeviceBuffer(batch_cap_ * 4);
    drop_graphs();  // they read the old device arrays
  }
  // Fixed offsets by capacity (not by this batch's T), so a graph's recorded addresses stay valid.
  int32_t* h = batch_host_;
  const size_t cap_t = batch_cap_ / 8;  // 4 arrays of cap_t ints, then cap_t seqs of 4 ints
  int32_t* dev = batch_dev_.as<int32_t>();
  d_tokens_ = dev;
  d_positions_ = dev + cap_t;
  d_token_seq_ = dev + 2 * cap_t;
  d_last_rows_ = dev + 3 * cap_t;
  d_seqs_ = reinterpret_cast<DevSeq*>(dev + 4 * cap_t);
  SPEAR_CHECK(T <= cap_t && S <= cap_t, "internal: batch staging too small");
  // The previous step's copy may still be reading the pinned buffer.
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::memcpy(h, d.tokens.data(), T * 4);
  std::memcpy(h + cap_t, d.positions.data(), T * 4);
  std::memcpy(h + 2 * cap_t, d.token_seq.data(), T * 4);
  std::memcpy(h + 3 * cap_t, d.last_rows.data(), S * 4);
  max_ctx_ = 0;
  for (size_t i = 0; i < S; ++i) {
    const SeqSlice& s = d.seqs[i];
    int32_t* o = h + 4 * cap_t + 4 * i;
    o[0] = s.token_begin, o[1] = s.n_tokens, o[2] = s.pos0, o[3] = s.kv_slot;
    kv->ensure(s.kv_slot, s.pos0 + s.n_tokens);
    max_ctx_ = std::max(max_ctx_, s.pos0 + s.n_tokens);
  }
  SPEAR_CUDA_CHECK(cudaMemcpyAsync(dev, h, (4 * cap_t + 4 * S) * 4, cudaMemcpyHostToDevice, stream_));
  kv->upload_table_if_dirty(stream_);
  batch_ = &d;
  batch_cache_ = kv;
  if (prof_->enabled())
    prof_->add_host("begin_batch", std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

const int32_t* CudaBackend::device_ints(std::span<const int32_t> v) {
  if (batch_) {
    if (v.data() == batch_->tokens.data()) return d_tokens_;
    if (v.data() == batch_->positions.data()) return d_positions_;
    if (v.data() == batch_->token_seq.data()) return d_token_seq_;
    if (v.data() == batch_->last_rows.data()) return d_last_rows_;
  }
  SPEAR_CHECK(!capturing_, "cuda backend: host array outside the batch description inside a graph capture");
  if (scratch_ints_.bytes() < v.size() * 4) scratch_ints_ = DeviceBuffer(std::max<size_t>(v.size() * 4, 4096));
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  SPEAR_CUDA_CHECK(cudaMemcpy(scratch_ints_.get(), v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  return scratch_ints_.as<int32_t>();
}

void CudaBackend::grow_w4_workspace(int n, int k) {
  if (n <= w4_max_n_ && k <= w4_max_k_) return;
  w4_max_n_ = std::max(w4_max_n_, n);
  w4_max_k_ = std::max(w4_max_k_, k);
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  w4_ws_ = DeviceBuffer(w4a16_workspace_bytes(128, w4_max_n_, w4_max_k_, sm_count_));
  SPEAR_CUDA_CHECK(cudaMemset(w4_ws_.get(), 0, w4_ws_.bytes()));
  drop_graphs();  // they recorded the old workspace
}

std::unique_ptr<Linear> CudaBackend::make_linear(const LinearWeights& w) {
  auto l = std::make_unique<CudaLinear>();
  l->name = w.name;
  l->in_features = w.in_features;
  l->out_features = w.out_features;
  l->w = upload_bf16(w.w);
  l->bias = upload_bf16(w.bias);
  l->bytes = (w.w.size() + w.bias.size()) * 2;
  return l;
}

std::unique_ptr<Linear> CudaBackend::make_quant_linear(const std::string& name, const PackedQuantWeights& w,
                                                       const std::vector<float>& bias) {
  auto l = std::make_unique<CudaLinear>();
  l->name = name;
  l->in_features = w.in;
  l->out_features = w.out;
  l->bias = upload_bf16(bias);
  if (!w4_supported(w)) {
    // 5..8-bit codes or odd group sizes: bf16 weights dequantized exactly as the reference, then cuBLAS.
    std::vector<float> deq = unpack_quantized(w).dequantize();
    l->w = upload_bf16(deq);
    l->bytes = (deq.size() + bias.size()) * 2;
    return l;
  }
  W4Layout lay = w4_prepare(w);
  l->quantized = true;
  l->q = upload_bytes(lay.q.data(), lay.q.size() * 4);
  l->scales = upload_bytes(lay.scales.data(), lay.scales.size() * 4);
  l->zeros = upload_bytes(lay.zeros.data(), lay.zeros.size() * 2);
  l->w4 = W4Device{lay.n, lay.k, lay.n_pad, lay.k_pad, lay.group_size, lay.groups, l->q.as<uint32_t>(),
                   l->scales.as<float>(), l->zeros.as<uint16_t>()};
  l->bytes = l->q.bytes() + l->scales.bytes() + l->zeros.bytes() + l->bias.bytes();
  grow_w4_workspace(lay.n, lay.k);
  w4_max_weights_ = std::max(w4_max_weights_, size_t(lay.n) * size_t(lay.k));
  return l;
}

Tensor CudaBackend::dense_weight_tensor(const Linear& l) {
  auto* d = dynamic_cast<const CudaLinear*>(&l);
  SPEAR_CHECK(d && !d->quantized, "dense_weight_tensor: '{}' is not a dense CUDA linear", l.name);
  Tensor t;
  t.data = d->w.get();
  t.dtype = DType::BF16;
  t.device = Device::CUDA;
  t.rows = l.out_features;
  t.cols = l.in_features;
  return t;
}

void CudaBackend::set_compensator(Linear& l, const Compensator* c) {
  auto& cl = static_cast<CudaLinear&>(l);
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  drop_graphs();  // they may hold the old compensator's buffers
  if (cl.ec) cl.bytes -= cl.ec->bytes;
  cl.ec.reset();
  if (c == nullptr) return;
  c->validate();
  SPEAR_CHECK(c->in == l.in_features && c->out == l.out_features, "'{}': compensator shape [{}, {}] does not match "
              "the linear [{}, {}]", l.name, c->out, c->in, l.out_features, l.in_features);
  auto ec = std::make_unique<CudaEc>();
  ec->in = c->in, ec->out = c->out, ec->rank = c->rank, ec->gate_width = c->gate_width;
  auto up = [](const std::vector<float>& v) { return upload_bytes(v.data(), v.size() * 4); };
  ec->A = up(c->A), ec->B = up(c->B);
  if (c->gated()) ec->W1 = up(c->W1), ec->b1 = up(c->b1), ec->W2 = up(c->W2), ec->b2 = up(c->b2);
  ec->A16 = upload_bf16(c->A), ec->B16 = upload_bf16(c->B);
  ec->scratch = DeviceBuffer(w4a16_ec_scratch_bytes(c->rank));
  w4a16_ec_scratch_init(ec->scratch.get(), c->rank);
  W4EcDevice& d = ec->dev;
  d.rank = c->rank;
  d.gate_width = c->gate_width;
  d.A = ec->A16.as<__nv_bfloat16>();
  d.B = ec->B16.as<__nv_bfloat16>();
  if (c->gated()) d.W1 = ec->W1.as<float>(), d.b1 = ec->b1.as<float>(), d.W2 = ec->W2.as<float>(), d.b2 = ec->b2.as<float>();
  d.scratch = ec->scratch.get();
  ec->bytes = c->bytes();  // as stored (bf16), like the CPU backend's accounting of packages
  cl.bytes += ec->bytes;
  cl.ec = std::move(ec);
}

std::unique_ptr<KvCache> CudaBackend::make_kv_cache(int n_layers, int n_slots, int max_tokens, int kv_dim) {
  return std::make_unique<CudaKvCache>(n_layers, n_slots, max_tokens, kv_dim);
}

void CudaBackend::gather_rows(const Tensor& table, std::span<const int32_t> ids, Tensor& out) {
  auto prof = prof_->scope("gather_rows");
  check_bf16(table, "gather table");
  check_bf16(out, "gather output");
  gather_rows_bf16(bf(table), table.cols, device_ints(ids), int(ids.size()), bf(out), stream_);
}

void CudaBackend::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) {
  auto prof = prof_->scope("rms_norm");
  check_bf16(x, "rms_norm input");
  rms_norm_bf16(bf(x), bf(w), bf(out), int(x.rows), int(x.cols), eps, stream_);
}

void CudaBackend::linear(const Tensor& x, const Linear& lin, Tensor& out) {
  const auto& l = static_cast<const CudaLinear&>(lin);
  check_bf16(x, "linear input");
  const int T = int(x.rows);
  if (T == 0) return;
  const auto* bias = l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr;
  if (l.quantized) {
    SPEAR_CHECK(out.dtype == DType::BF16, "'{}': the W4 kernel writes bf16 outputs", l.name);
    const EcPath path = l.ec ? choose_ec_path(l, x) : EcPath::Auto;
    if (path == EcPath::Fused && linear_deferred(l, x, out)) return;
    if (path == EcPath::Fused) {
      __nv_bfloat16* y = bf(out);
      const W4EcDevice* ec = &l.ec->dev;
      tune_w4_once(bf(x), T, &l.w4, 1, &y, &ec);
      auto prof = prof_->scope("linear.w4a16_ec_fused");
      if (w4a16_gemm_ec(bf(x), T, &l.w4, 1, &ec, &bias, &y, sm_count_, stream_)) return;
    }  // no decode plan fits with the EC's shared memory: the naive path below
    const EcPath path_run = path == EcPath::Fused ? EcPath::Naive : path;
    Tensor d;
    if (path_run == EcPath::Overlapped) d = ec_overlap_fork(*l.ec, x);
    w4_gemm(l, x, out);
    if (path_run == EcPath::Overlapped) {
      ec_overlap_join(*l.ec, d, out);
    } else if (path_run == EcPath::Naive) {
      auto prof = prof_->scope("linear.ec_naive");
      apply_ec_naive(*l.ec, x, out);
    }
    return;
  }
  SPEAR_CHECK(!(out.dtype == DType::F32 && l.ec), "'{}': compensators on fp32 outputs are not supported", l.name);
  const EcPath path = l.ec ? choose_ec_path(l, x) : EcPath::Auto;
  Tensor d;
  if (path == EcPath::Overlapped) d = ec_overlap_fork(*l.ec, x);
  dense_gemm(l, x, out);
  if (path == EcPath::Overlapped)
    ec_overlap_join(*l.ec, d, out);
  else if (l.ec)
    apply_ec_naive(*l.ec, x, out);
}

void CudaBackend::dense_gemm(const CudaLinear& l, const Tensor& x, Tensor& out) {
  const int T = int(x.rows);
  const auto* bias = l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr;
  const bool f32 = out.dtype == DType::F32;
  if (f32 && T <= gemv_max_m_) {  // the lm_head of a decode step (fp32 logits)
    auto prof = prof_->scope("linear.gemv_f32out");
    if (dense_gemv_bf16(bf(x), T, l.w.as<__nv_bfloat16>(), l.out_features, l.in_features, bias, out.data, true,
                        stream_))
      return;
  }
  auto prof = prof_->scope(f32 ? "linear.cublas_bf16_f32out" : "linear.cublas_bf16");
  cublas_linear(l.w.get(), l.out_features, l.in_features, x.data, T, bias, out.data, f32);
}

void CudaBackend::cublas_linear(const void* w, int n, int k, const void* x, int m, const __nv_bfloat16* bias,
                                void* y, bool f32_out) {
  // Row-major y[m, n] = x[m, k]·Wᵀ is column-major yᵀ[n, m] = W[n, k] (i.e. (Wᵀ col-major)ᵀ) · xᵀ.
  const float alpha = 1.f, beta = 0.f;
  SPEAR_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                                  CUDA_R_16BF, k, &beta, y, f32_out ? CUDA_R_32F : CUDA_R_16BF, n,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (!bias) return;
  if (f32_out)
    add_bias_f32(static_cast<float*>(y), bias, m, n, stream_);
  else
    add_bias_bf16(static_cast<__nv_bfloat16*>(y), bias, m, n, stream_);
}

void CudaBackend::tune_w4_once(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                               __nv_bfloat16* const* y, const W4EcDevice* const* ec, const W4Fusion* fusion) {
  if (!tune_w4_ || capturing_ || w4a16_decode_tuned(m, w, count, ec)) return;
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  SPEAR_CUDA_CHECK(cudaStreamIsCapturing(stream_, &cs));
  if (cs != cudaStreamCaptureStatusNone) return;
  // An L2 flush buffer for the timing (2 × L2), only while tuning; without the memory, tune on a warm L2.
  const size_t flush_bytes = 2 * std::max<size_t>(l2_bytes_, size_t(8) << 20);
  void* flush = nullptr;
  if (cudaMalloc(&flush, flush_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    flush = nullptr;
  }
  const bool after = tune_after_ && last_w4_replay_ && prof_->ops() == last_w4_ops_;
  try {
    const bool plain = !ec && !fusion;
    w4a16_tune_decode(x, m, w, count, y, flush, flush_bytes, sm_count_, stream_, 5, ec, tune_fused_ ? fusion : nullptr,
                      after ? &last_w4_replay_ : nullptr, plain ? w4_ws_.get() : nullptr, plain ? w4_ws_.bytes() : 0);
  } catch (...) {
    if (flush) cudaFree(flush);
    throw;
  }
  if (flush) SPEAR_CUDA_CHECK(cudaFree(flush));
}

void CudaBackend::note_w4_launch(std::function<void()> replay) {
  last_w4_replay_ = std::move(replay);
  last_w4_ops_ = prof_->ops();
}

void CudaBackend::linear_group(const Tensor& x, std::span<const Linear* const> ls, std::span<Tensor* const> outs) {
  // One launch when every member is a W4 linear (q/k/v, gate/up of a quantized model) and each compensator
  // among them runs fused; otherwise one linear() per member (each with its own EC path).
  bool grouped = ls.size() >= 2 && ls.size() <= size_t(kW4MaxGrouped) && x.rows > 0;
  bool any_ec = false, all_fused = true;
  for (const Linear* l : ls) {
    const auto* c = static_cast<const CudaLinear*>(l);
    grouped = grouped && c->quantized && c->in_features == ls[0]->in_features;
    if (grouped && c->ec) any_ec = true, all_fused = all_fused && choose_ec_path(*c, x) == EcPath::Fused;
  }
  // Prefill-sized inputs: each member through dequantization + cuBLAS (w4_gemm), one after the other as the
  // grouped W4 kernel would run them anyway beyond the decode kernel's 32 tokens.
  if (!grouped || (any_ec && !all_fused) || w4_dequant_ready(int(x.rows))) {
    Backend::linear_group(x, ls, outs);
    return;
  }
  check_bf16(x, "linear input");
  W4Device w[kW4MaxGrouped];
  const __nv_bfloat16* bias[kW4MaxGrouped];
  __nv_bfloat16* y[kW4MaxGrouped];
  const W4EcDevice* ec[kW4MaxGrouped] = {};
  for (size_t i = 0; i < ls.size(); ++i) {
    const auto* c = static_cast<const CudaLinear*>(ls[i]);
    w[i] = c->w4;
    bias[i] = c->bias.bytes() ? c->bias.as<__nv_bfloat16>() : nullptr;
    y[i] = bf(*outs[i]);
    if (c->ec) ec[i] = &c->ec->dev;
  }
  if (any_ec && linear_group_deferred(x, ls, outs, w, bias, y)) return;
  tune_w4_once(bf(x), int(x.rows), w, int(ls.size()), y, any_ec ? ec : nullptr);
  if (any_ec) {
    bool done = false;
    {
      auto prof = prof_->scope("linear.w4a16_grouped_ec_fused");
      done = w4a16_gemm_ec(bf(x), int(x.rows), w, int(ls.size()), ec, bias, y, sm_count_, stream_);
    }
    if (!done) Backend::linear_group(x, ls, outs);  // no plan fits the group as a whole: one by one
    return;
  }
  auto prof = prof_->scope("linear.w4a16_grouped");
  w4a16_gemm_grouped(bf(x), int(x.rows), w, int(ls.size()), bias, y, w4_ws_.get(), w4_ws_.bytes(), sm_count_,
                     stream_);
}

const float* CudaBackend::rope_inv_freq(const RopeTable& table) {
  auto it = rope_tables_.find(&table);
  if (it == rope_tables_.end()) {
    SPEAR_CHECK(!capturing_, "cuda backend: RoPE table first seen inside a graph capture");
    it = rope_tables_.emplace(&table, upload_bytes(table.inv_freq.data(), table.inv_freq.size() * 4)).first;
  }
  return it->second.as<float>();
}

void CudaBackend::rope(Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
                       const RopeTable& table) {
  auto prof = prof_->scope("rope");
  rope_bf16(bf(x), int(x.rows), n_heads, head_dim, device_ints(positions), rope_inv_freq(table), stream_);
}

bool CudaBackend::rope_qk(Tensor& q, Tensor& k, const Tensor& v, int n_heads, int n_kv_heads, int head_dim,
                          std::span<const int32_t> positions, const RopeTable& table, KvCache& cache, int layer) {
  auto* kv = dynamic_cast<CudaKvCache*>(&cache);
  // The fused kernel needs this batch's device arrays (begin_batch); otherwise the plain path.
  if (!kv || kv != batch_cache_ || !batch_ || positions.data() != batch_->positions.data())
    return Backend::rope_qk(q, k, v, n_heads, n_kv_heads, head_dim, positions, table, cache, layer);
  check_bf16(q, "rope q");
  check_bf16(k, "rope k");
  check_bf16(v, "attention v");
  SPEAR_CHECK(k.cols == int64_t(n_kv_heads) * head_dim, "rope_qk: k has {} columns, {} KV heads of {} need {}", k.cols,
              n_kv_heads, head_dim, int64_t(n_kv_heads) * head_dim);
  auto prof = prof_->scope("rope_kv_append");
  rope_kv_append_bf16(bf(q), bf(k), bf(v), int(q.rows), n_heads, head_dim, device_ints(positions),
                      rope_inv_freq(table), d_token_seq_, d_seqs_, kv->layer(layer), stream_);
  return true;
}

// Flash-decoding splits need scratch sized by batch, heads and the cache's pages; grown outside captures (a graph's
// first run is eager), and graphs recorded with the old buffer are dropped.
void CudaBackend::ensure_attention_workspace(int T, const AttentionParams& p, const PagedKvLayer& layer) {
  const size_t need = attention_workspace_bytes(std::max(T, 8), p.n_heads, p.head_dim, layer.max_blocks);
  if (need <= attn_ws_.bytes()) return;
  SPEAR_CHECK(!capturing_, "cuda backend: attention workspace grown inside a graph capture");
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  attn_ws_ = DeviceBuffer(need);
  SPEAR_CUDA_CHECK(cudaMemset(attn_ws_.get(), 0, attention_workspace_zero_bytes()));
  drop_graphs();
}

static AttnShape attn_shape_of(const AttentionParams& p) {
  AttnShape s;
  s.n_heads = p.n_heads;
  s.n_kv_heads = p.n_kv_heads;
  s.head_dim = p.head_dim;
  s.window = p.window;
  s.scale = p.scale;
  return s;
}

bool CudaBackend::rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const int32_t> positions,
                                 const RopeTable& table, std::span<const SeqSlice> seqs, KvCache& cache,
                                 const AttentionParams& p, Tensor& out) {
  auto* kv = dynamic_cast<CudaKvCache*>(&cache);
  if (!rope_attn_on_ || !kv || kv != batch_cache_ || !batch_ || positions.data() != batch_->positions.data() ||
      seqs.data() != batch_->seqs.data() || !batch_->decode_only())
    return false;
  check_bf16(q, "rope q");
  check_bf16(k, "rope k");
  check_bf16(v, "attention v");
  SPEAR_CHECK(k.cols == int64_t(p.n_kv_heads) * p.head_dim && v.cols == k.cols,
              "rope_attention: k / v have {} / {} columns, {} KV heads of {} need {}", k.cols, v.cols, p.n_kv_heads,
              p.head_dim, int64_t(p.n_kv_heads) * p.head_dim);
  const PagedKvLayer layer = kv->layer(p.layer);
  const int T = int(q.rows);
  ensure_attention_workspace(T, p, layer);
  auto prof = prof_->scope("attention.decode_rope");
  attention_decode_rope_bf16(bf(q), bf(k), bf(v), T, device_ints(positions), rope_inv_freq(table), d_token_seq_,
                             d_seqs_, int(seqs.size()), layer, attn_shape_of(p), bf(out), attn_ws_.get(),
                             attn_ws_.bytes(), stream_);
  ++rope_attn_launches_;
  return true;
}

void CudaBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const SeqSlice> seqs,
                            KvCache& cache, const AttentionParams& p, Tensor& out) {
  auto* kv = dynamic_cast<CudaKvCache*>(&cache);
  SPEAR_CHECK(kv && kv == batch_cache_ && batch_ && seqs.data() == batch_->seqs.data(),
              "cuda backend: attention must run on the batch and KV cache given to begin_batch");
  const PagedKvLayer layer = kv->layer(p.layer);
  const int T = int(q.rows);
  if (!p.kv_appended) {
    auto prof = prof_->scope("kv_append");
    kv_append_bf16(bf(k), bf(v), T, d_token_seq_, d_seqs_, layer, stream_);
  }
  const bool decode = batch_->decode_only();
  if (decode) ensure_attention_workspace(T, p, layer);
  auto prof = prof_->scope(decode ? "attention.decode" : "attention.prefill");
  attention_bf16(bf(q), T, d_token_seq_, d_seqs_, int(seqs.size()), layer, attn_shape_of(p), max_ctx_, decode,
                 bf(out), decode ? attn_ws_.get() : nullptr, decode ? attn_ws_.bytes() : 0, stream_);
}

bool CudaBackend::fused_mlp(Tensor& x, const Tensor& add, const Tensor& norm_w, float eps, const Linear& gate,
                            const Linear& up, const Linear& down) {
  const auto& g = static_cast<const CudaLinear&>(gate);
  const auto& u = static_cast<const CudaLinear&>(up);
  const auto& d = static_cast<const CudaLinear&>(down);
  const int m = int(x.rows);
  if (!fused_mlp_on_ || x.dtype != DType::BF16 || (add.data && add.dtype != DType::BF16)) return false;
  for (const CudaLinear* l : {&g, &u, &d})
    if (!l->quantized || l->ec || l->bias.bytes()) return false;
  if (!fused_mlp_supported(m, g.w4, u.w4, d.w4)) return false;
  SPEAR_CHECK(x.cols == g.in_features && d.out_features == g.in_features && norm_w.numel() == x.cols &&
                  (!add.data || (add.rows == x.rows && add.cols == x.cols)),
              "fused_mlp: x [{}, {}], add [{}, {}], norm {} do not fit '{}' ({} -> {})", x.rows, x.cols, add.rows,
              add.cols, norm_w.numel(), g.name, g.in_features, g.out_features);
  if (!mlp_counters_.get()) {
    SPEAR_CHECK(!capturing_, "cuda backend: fused MLP counters first needed inside a graph capture");
    mlp_counters_ = DeviceBuffer(kFusedMlpCounterBytes);
    SPEAR_CUDA_CHECK(cudaMemset(mlp_counters_.get(), 0, kFusedMlpCounterBytes));
  }
  Tensor act = alloc(m, g.out_features);
  auto prof = prof_->scope("mlp.fused");
  FusedMlpArgs a;
  a.x = bf(x);
  a.add = add.data ? bf(add) : nullptr;
  a.norm_w = bf(norm_w);
  a.eps = eps;
  a.gate = g.w4;
  a.up = u.w4;
  a.down = d.w4;
  a.act = bf(act);
  a.counters = mlp_counters_.as<unsigned>();
  a.m = m;
  a.sm_count = sm_count_;
  fused_mlp_decode(a, stream_);
  return true;
}

void CudaBackend::swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  auto prof = prof_->scope("swiglu");
  swiglu_bf16(bf(gate), bf(up), bf(out), gate.numel(), stream_);
}

void CudaBackend::add(Tensor& x, const Tensor& y) {
  auto prof = prof_->scope("add");
  add_bf16(bf(x), bf(y), x.numel(), stream_);
}

void CudaBackend::add_rms_norm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) {
  check_bf16(x, "residual");
  check_bf16(y, "residual update");
  SPEAR_CHECK(x.rows == y.rows && x.cols == y.cols && out.rows == x.rows && out.cols == x.cols && w.numel() == x.cols,
              "add_rms_norm: shapes [{}, {}], [{}, {}], out [{}, {}], weight {}", x.rows, x.cols, y.rows, y.cols,
              out.rows, out.cols, w.numel());
  SPEAR_CHECK(out.data != x.data && out.data != y.data, "add_rms_norm: out must not alias x or y");
  auto prof = prof_->scope("add_rms_norm");
  add_rms_norm_bf16(bf(x), bf(y), bf(w), bf(out), int(x.rows), int(x.cols), eps, stream_);
}

void CudaBackend::argmax_rows(const Tensor& x, Tensor& ids) {
  auto prof = prof_->scope("argmax");
  SPEAR_CHECK(x.dtype == DType::F32, "argmax_rows: fp32 logits expected");
  argmax_rows_f32(x.ptr<float>(), int(x.rows), int(x.cols), ids.ptr<int32_t>(), stream_);
}

}  // namespace spear::cuda
