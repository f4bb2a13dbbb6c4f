#pragma once
// CUDA backend: bf16 activations and weights on one GPU and one stream, fp32 accumulation and statistics.
// Dense linears go through cuBLAS (bf16 in, fp32 compute); quantized ones through the W4A16 kernel
// (w4a16_gemm.h), or, for layouts it does not take (8-bit containers, odd group sizes), as bf16 weights
// dequantized at load. The KV cache is paged (attention.h); decode steps run as replayed CUDA graphs
// (run_graph). Activations come from a caching pool (device_pool.h).
#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend/backend.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/dense_gemv.h"
#include "backend/cuda/device_pool.h"
#include "backend/cuda/op_profiler.h"
#include "backend/cuda/p2p_reduce.h"
#include "backend/cuda/tp_tail.h"
#include "backend/cuda/w4a16_gemm.h"

struct ncclComm;  // nccl.h's communicator, declared here so that only the backend's sources need nccl.h

namespace spear::cuda {

#define SPEAR_CUBLAS_CHECK(expr)                                                             \
  do {                                                                                       \
    cublasStatus_t st_ = (expr);                                                             \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::spear::fail("cuBLAS error at {}:{}: {} ({})", __FILE__, __LINE__, int(st_), #expr); \
  } while (0)


// One cudaMalloc'd buffer, freed with its owner.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return p_; }
  size_t bytes() const { return n_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// An error compensator on the device (spear/compensator.h has the formula and shapes): fp32 parameters for the
// naive path and the gate, bf16 copies of A and B for the fused and overlapped paths (what a package stores),
// and the fused kernel's scratch (w4a16_gemm.h).
struct CudaEc {
  int in = 0, out = 0, rank = 0, gate_width = 0;
  size_t bytes = 0;
  DeviceBuffer A, B, W1, b1, W2, b2;
  DeviceBuffer A16, B16, scratch;
  W4EcDevice dev;
};

class CudaLinear : public Linear {
 public:
  std::unique_ptr<CudaEc> ec;
  bool quantized = false;
  DeviceBuffer w;                // dense: bf16 [out, in]
  DeviceBuffer q, scales, zeros;  // W4 layout (w4a16_gemm.h)
  W4Device w4;
  DeviceBuffer bias;             // bf16 [out] or empty
  size_t bytes = 0;
  size_t weight_bytes() const override { return bytes; }
};

class CudaKvCache : public KvCache {
 public:
  CudaKvCache(int n_layers, int n_slots, int max_tokens, int kv_dim);
  int num_slots() const override { return n_slots_; }
  int max_tokens() const override { return max_tokens_; }
  size_t bytes() const override { return pool_.bytes() + table_.bytes(); }
  uint64_t id() const { return id_; }
  // Maps pages so that `slot` holds positions [0, n_tokens); uploads the block table when it changed.
  void ensure(int slot, int n_tokens);
  void upload_table_if_dirty(cudaStream_t stream);
  PagedKvLayer layer(int l) const;
  int blocks_in_use() const { return int(n_blocks_) - int(free_.size()); }

 private:
  int n_layers_, n_slots_, max_tokens_, kv_dim_, max_blocks_;
  size_t n_blocks_;
  uint64_t id_;
  DeviceBuffer pool_;   // [layer][k|v][block][kBlockTokens][kv_dim] bf16
  DeviceBuffer table_;  // [n_slots][max_blocks] int32
  std::vector<int32_t> host_table_;
  std::vector<int> slot_blocks_;
  std::vector<int32_t> free_;
  bool dirty_ = false;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device = 0);
  ~CudaBackend() override;
  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }
  cudaStream_t stream() const { return stream_; }

  Tensor alloc(int64_t rows, int64_t cols) override;
  Tensor alloc_f32(int64_t rows, int64_t cols) override;
  Tensor alloc_ids(int64_t rows) override;
  Tensor upload(const float* host, int64_t rows, int64_t cols) override;
  void download(const Tensor& t, float* host) override;
  void download_i32(const Tensor& t, int32_t* host) override;
  void begin_batch(const BatchDesc& d, KvCache& cache) override;
  Tensor run_graph(uint64_t key, const std::function<Tensor()>& body) override;
  std::unique_ptr<Linear> make_linear(const LinearWeights& w) override;
  std::unique_ptr<Linear> make_quant_linear(const std::string& name, const PackedQuantWeights& w,
                                            const std::vector<float>& bias) override;
  Tensor dense_weight_tensor(const Linear& l) override;
  void set_compensator(Linear& l, const Compensator* c) override;
  std::pair<int, int> compensator_shape(const Linear& l) const override {
    const auto& c = static_cast<const CudaLinear&>(l);
    return c.ec ? std::pair<int, int>{c.ec->rank, c.ec->gate_width} : std::pair<int, int>{0, 0};
  }
  std::unique_ptr<KvCache> make_kv_cache(int n_layers, int n_slots, int max_tokens, int kv_dim) override;
  void set_ec_path(EcPath p) override;
  void set_ec_dispatch(std::shared_ptr<const EcDispatchTable> t) override;
  void set_verbose(bool v) override { verbose_ = v; }
  void set_prefill_graphs(bool on) override;  // SPEAR_PREFILL_GRAPHS, when set, wins (experiments)
  std::vector<EcTiming> time_ec_paths(std::span<const Linear* const> ls, std::span<const int> tokens,
                                      int reps) override;

  void gather_rows(const Tensor& table, std::span<const int32_t> ids, Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override;
  void linear(const Tensor& x, const Linear& w, Tensor& out) override;
  void linear_group(const Tensor& x, std::span<const Linear* const> ls, std::span<Tensor* const> outs) override;
  void rope(Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
            const RopeTable& table) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const SeqSlice> seqs,
                 KvCache& cache, const AttentionParams& p, Tensor& out) override;
  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void add(Tensor& x, const Tensor& y) override;
  void add_rms_norm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) override;
  // Decode batches (one token per sequence, this batch's arrays): attention_decode_rope_bf16, one launch for RoPE, the
  // KV append and attention (SPEAR_ROPE_ATTN=0 turns it off: rope_qk's kernel, then attention's).
  bool rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const int32_t> positions,
                      const RopeTable& table, std::span<const SeqSlice> seqs, KvCache& cache, const AttentionParams& p,
                      Tensor& out) override;
  void set_rope_attention(bool on) { rope_attn_on_ = on; }  // tests, A/B runs
  size_t rope_attention_launches() const { return rope_attn_launches_; }  // enqueued so far (tests)
  // Instantiated graphs kept now, of prefill (or mixed) iterations or of decode steps (tests).
  size_t graphs_kept(bool prefill) const;
  bool rope_qk(Tensor& q, Tensor& k, const Tensor& v, int n_heads, int n_kv_heads, int head_dim,
               std::span<const int32_t> positions, const RopeTable& table, KvCache& cache, int layer) override;
  void argmax_rows(const Tensor& x, Tensor& ids) override;

  // Tensor parallelism: a group of more than one rank creates the NCCL communicator here (NCCL is loaded at run
  // time, nccl_loader.h), then, unless TpReduce::Nccl, the P2P dual-write buffers (p2p_reduce.h) of every rank,
  // mapped into every other rank: by peer access for ranks of this process (threads), by CUDA IPC handles for
  // ranks in other processes of this host. Collective: every rank calls it, each with its own device, and all
  // ranks agree on whether P2P is used. SPEAR_TP_REDUCE (auto | nccl | p2p | fused) sets the initial mode,
  // SPEAR_TP_P2P_CAPACITY the staging capacity in bf16 elements (default 2^20; at most 4 · kP2pBlockElems per SM,
  // so that a call's CTAs are all resident), SPEAR_TP_P2P_TIMEOUT_MS how long a P2P kernel waits for a peer
  // before it traps (default 0: forever, as NCCL; the fused tail's kernel too).
  void set_tp_reduce(TpReduce r) override;
  std::string tp_reduce_description() const override;
  // The P2P dual-write from the row-parallel W4 GEMM's epilogue under the fused tail (SPEAR_TP_GEMM_PUSH; tests).
  void set_tp_gemm_push(bool on) { gemm_push_ = on; }
  void set_process_group(std::shared_ptr<ProcessGroup> pg) override;
  // In-place sums on stream_: the P2P kernel, one launch per tensor, for bf16 tensors of up to the capacity and
  // fp32 ones of up to half of it (same staging bytes); one NCCL group for the others. No synchronisation, so it
  // may be captured into a graph.
  void all_reduce_sum(std::span<Tensor* const> ts) override;
  void all_gather_cols(const Tensor& part, Tensor& full) override;
  // Whether all_reduce_sum reduces t with the P2P kernel (tests, reports).
  bool all_reduce_uses_p2p(const Tensor& t) const;
  void linear_ec_partial(const Tensor& x, const Linear& l, Tensor& out, Tensor& z) override;
  void ec_expand(const Tensor& z, const Linear& l, Tensor& out) override;
  // Under TpReduce::Fused: this rank's GEMM without its compensator, then tp_tail_bf16 (tp_tail.h) on stream_:
  // the sum over the ranks, the EC, x += y and h = rms_norm(x)·norm_w in one launch. False (nothing done) for other
  // modes, more than kTpTailMaxRows tokens, hidden sizes beyond SPEAR_TP_TAIL_MAX_H (default 16384), EC ranks or
  // gates beyond 64, or non-bf16 tensors. No synchronisation: capturable into a graph.
  bool fused_mlp(Tensor& x, const Tensor& add, const Tensor& norm_w, float eps, const Linear& gate, const Linear& up,
                 const Linear& down) override;
  void set_fused_mlp(bool on) { fused_mlp_on_ = on; }  // tests, A/B runs (SPEAR_FUSED_MLP=1 turns it on)
  // The W4 decode kernels with the residual add in their epilogue and the RMSNorm or SwiGLU after them inside the
  // launch (w4a16_gemm_fused; cuda_backend_fusion.cpp): W4 linears without compensators, up to 8 tokens. The residual
  // form stands aside while the fused MLP block is on (that block takes the o projection's output).
  bool linear_fused(const Tensor& in, std::span<const Linear* const> ls, std::span<Tensor* const> outs,
                    const LinearFusion& f) override;
  // Which fusions run (SPEAR_DECODE_FUSION, a bit mask; 0 = none, 7 = all): bit 0 the o projection's residual add
  // and MLP norm, bit 1 gate/up's SwiGLU, bit 2 the down projection's residual add and next norm (told apart by the
  // linear's name), at up to max_m tokens (SPEAR_DECODE_FUSION_MAX_M, 1..8). Default: none. On the H200 the norm
  // tails lose (a CTA that waits for every other one, then normalises alone, is slower than the norm kernel PDL has
  // already started: +2–3% at batch 1, up to +16% at 8B batch 8; bench/results/cuda-h200-decodefusion). The SwiGLU
  // tail won at one token when it came (1B −4.4%, 8B −3.3%) and was the default until the grouped gate/up launch on
  // the bulk kernel overtook it: without it the W4 step is now faster (1B −3.5%, 8B −1.5%, 3B within the spread
  // between processes), and so is a step with ECs on 15% of the linears; with ECs on 60% it is 0–2.6% slower
  // (bench/results/cuda-h200-fusiondefault). SPEAR_DECODE_FUSION=2 brings it back at one token.
  void set_decode_fusion(int mask, int max_m = 8) { decode_fusion_mask_ = mask, decode_fusion_max_m_ = max_m; }
  size_t fused_linear_launches() const { return fused_linear_launches_; }  // enqueued so far (tests)
  size_t fused_ec_linear_launches() const { return fused_ec_linear_launches_; }  // those with a compensator
  bool row_parallel_tail(const Tensor& in, const Linear& l, Tensor& x, const Tensor& norm_w, float eps,
                         Tensor& h) override;
  // The deferred EC (ec_after_gemm.h; one device, min_m to 32 tokens, W4 linears whose compensators, of rank 8 or
  // 16, the dispatch sends to the fused path): the GEMM launch runs plain and the launch after it computes the whole
  // term. For o_proj / down_proj that is the residual add + norm (this call); with `groups`, the other linears and
  // groups get a launch of their own (linear, linear_group). False where it does not apply or is off. Default: the
  // norm launch from 2 tokens; measured on the H200 (bench/results/cuda-h200-ecdefer), the in-kernel EC is faster
  // at one token, and a launch of its own costs about what it saves.
  bool linear_residual_norm(const Tensor& in, const Linear& l, Tensor& x, const Tensor& norm_w, float eps,
                            Tensor& h) override;
  // Tests, A/B runs (SPEAR_EC_DEFER=0 off, 1 the norm launch, 2 also launches of their own; SPEAR_EC_DEFER_MIN_M).
  void set_ec_defer(bool on, int min_m = 2, bool groups = false) {
    ec_defer_ = on, ec_defer_min_m_ = min_m, ec_defer_groups_ = groups;
  }
  size_t deferred_ec_launches() const { return deferred_ec_launches_; }  // enqueued so far (tests)
  // The gate / up pair's ECs added by the SwiGLU launch (swiglu_ec.h; one device, at least one of the two compensated
  // and every compensator on the fused path): the grouped GEMM launch runs the plain plan with EC CTAs beside it that
  // leave g ⊙ z, which nothing in the launch waits for. Up to max_m tokens (0: off; then the ECs run inside the GEMM
  // launch); default one token, where it measured faster on the H200 (at 60% ECs, 1B -2.4%, 8B -4.3%; at 8 tokens 1B
  // lost up to 4.8%: bench/results/cuda-h200-ecswiglu). SPEAR_EC_SWIGLU=N sets max_m.
  bool linear_swiglu(const Tensor& in, const Linear& gate, const Linear& up, Tensor& gate_out,
                     Tensor& up_out) override;
  void set_ec_swiglu(int max_m) { ec_swiglu_max_m_ = max_m; }
  size_t ec_swiglu_launches() const { return ec_swiglu_launches_; }  // enqueued so far (tests)

  int sm_count() const { return sm_count_; }
  size_t activation_bytes() const { return pool_->reserved_bytes(); }

 private:
  // Device copy of a host int array: the batch's arrays when `v` is one of them, else a synchronous upload
  // into scratch (never inside a graph capture).
  const int32_t* device_ints(std::span<const int32_t> v);
  void grow_w4_workspace(int n, int k);
  // Tunes the W4 decode kernel's plan for this launch shape the first time it is seen (w4a16_tune_decode):
  // eager runs only, since tuning synchronizes; the first run of every graph key is eager (run_graph). fusion: the
  // tails a fused launch will run, timed with every plan (SPEAR_W4_TUNE_FUSED=0: plain timing, for A/B runs). A
  // launch that directly follows another W4 launch (no op in between: the fused gate/up's SwiGLU launch and the down
  // projection at one token) is timed behind a replay of it (SPEAR_W4_TUNE_AFTER=0: alone). Plain launches get the W4
  // workspace, so that at more than 16 tokens the general kernel is timed too (and runs where it wins).
  void tune_w4_once(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y,
                    const W4EcDevice* const* ec = nullptr, const W4Fusion* fusion = nullptr);
  // After enqueuing a W4 launch that may be enqueued again unchanged (no residual add), eager and tuning: how, for
  // tune_w4_once.
  void note_w4_launch(std::function<void()> replay);
  void drop_graphs();
  void ensure_attention_workspace(int T, const AttentionParams& p, const PagedKvLayer& layer);
  // Captures what body enqueues on stream_ (capturing_ set meanwhile) and instantiates it.
  cudaGraphExec_t capture_graph(const std::function<void()>& body);
  const float* rope_inv_freq(const RopeTable& table);  // the table's device copy (uploaded at first use)
  // y += B·(g ⊙ A·x), as separate cuBLAS SGEMMs and element-wise kernels (ec_naive.h): ec_project, then
  // ec_expand_naive (the halves that tensor parallelism runs on either side of its all-reduce).
  void apply_ec_naive(const CudaEc& ec, const Tensor& x, Tensor& y);
  // z[T, rank] (fp32) = A·x for bf16 x, by an fp32 SGEMM.
  void ec_project(const CudaEc& ec, const Tensor& x, Tensor& z);
  // y (bf16) += B·(g(z) ⊙ z), the gate computed from z.
  void ec_expand_naive(const CudaEc& ec, const Tensor& z, Tensor& y);
  // The overlapped path: forks onto ec_stream_ and computes g ⊙ A·x there (returns it, fp32 [T][rank]; the
  // caller holds it until the join); the caller enqueues the GEMM on stream_, then ec_overlap_join adds
  // B·(g ⊙ z) into y on stream_ after the join (ec_overlap.h).
  Tensor ec_overlap_fork(const CudaEc& ec, const Tensor& x);
  void ec_overlap_join(const CudaEc& ec, const Tensor& zg, Tensor& y);
  // Whether the deferred EC takes these fused-path compensators with input x (set_ec_defer; with outs, also their
  // own launch after the plain GEMM, ec_apply_bf16, outs[i] holding linear i's output), and that launch.
  bool defers_ec(std::span<const CudaLinear* const> ls, const Tensor& x, std::span<Tensor* const> outs) const;
  void apply_deferred_ecs(std::span<const CudaLinear* const> ls, const Tensor& x, std::span<Tensor* const> outs);
  // One W4 linear with a compensator, deferred (SPEAR_EC_DEFER=2): the plain GEMM, then its term's launch. False,
  // nothing enqueued, where the deferred EC does not take it.
  bool linear_deferred(const CudaLinear& l, const Tensor& x, Tensor& out);
  // A W4 group with compensators, deferred (SPEAR_EC_DEFER=2): the plain group's launch (w, bias, y as
  // w4a16_gemm_grouped takes them), then one launch for the compensated members' terms. False, nothing enqueued,
  // where the deferred EC does not take them.
  bool linear_group_deferred(const Tensor& x, std::span<const Linear* const> ls, std::span<Tensor* const> outs,
                             const W4Device* w, const __nv_bfloat16* const* bias, __nv_bfloat16* const* y);
  // The path this linear's compensator takes for m tokens (never Auto); reported once when verbose.
  EcPath choose_ec_path(const CudaLinear& l, const Tensor& x);
  void w4_gemm(const CudaLinear& l, const Tensor& x, Tensor& out);  // the plain W4 GEMM (tuned at first use)
  // The plain dense GEMM of a bf16 linear (+ bias): the GEMV kernel for fp32 outputs of a few tokens, else cuBLAS.
  void dense_gemm(const CudaLinear& l, const Tensor& x, Tensor& out);
  // out = x·Wᵀ (+ bias) without the compensator: w4_gemm or dense_gemm (linear_ec_partial's GEMM).
  void linear_no_ec(const CudaLinear& l, const Tensor& x, Tensor& out);
  void destroy_comm();
  // Part of set_process_group: allocates, exchanges and maps the P2P buffers (and under TpReduce::Fused the fused
  // tail's, in the same records); sets p2p_ (and tail_) when every rank could.
  void setup_p2p();
  // Unmaps the peers' buffers, waits for every rank (a barrier of the group, while P2P is in use and no exception
  // is unwinding) and frees this rank's; never throws. The stream must have drained.
  void release_p2p();
  // Everything tensor parallelism set up, in a safe order (never throws): graphs (they hold P2P and NCCL
  // kernels), the streams' work, the P2P buffers, the communicator.
  void teardown_tp();
  // y[m, n] = x[m, k] · Wᵀ (+ bias) with cuBLAS on stream_: W bf16 [n][k], x bf16, y bf16 or fp32 (f32_out).
  void cublas_linear(const void* w, int n, int k, const void* x, int m, const __nv_bfloat16* bias, void* y,
                     bool f32_out);
  // Whether m tokens take dequantization + cuBLAS BF16 (m >= w4_dequant_min_m_): allocates the scratch matrix
  // at first use (outside captures; without the memory the W4 kernel keeps every size).
  bool w4_dequant_ready(int m);
  // y[T,n] = x[T,k]·w[n,k]ᵀ, fp32, on `handle` (cublas_ or cublas_ec_).
  void sgemm_nt(const float* x, int T, int k, const float* w, int n, float* y, cublasHandle_t handle = nullptr);

  int device_ = 0, sm_count_ = 0;
  size_t l2_bytes_ = 0;
  bool tune_w4_ = true;  // SPEAR_W4_TUNE=0 turns tuning off (the time model's plans)
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer cublas_ws_;
  // The overlapped EC path's second stream, its cuBLAS handle (own fixed workspace) and fork / join events.
  cudaStream_t ec_stream_ = nullptr;
  cublasHandle_t cublas_ec_ = nullptr;
  DeviceBuffer cublas_ec_ws_;
  cudaEvent_t ev_fork_ = nullptr, ev_join_ = nullptr;
  EcPath ec_path_ = EcPath::Auto;
  std::shared_ptr<const EcDispatchTable> ec_table_;
  bool verbose_ = false;
  std::set<std::pair<const void*, int>> ec_reported_;  // (linear, token bucket) decisions already printed
  std::shared_ptr<DevicePool> pool_;
  DeviceBuffer w4_ws_, attn_ws_;
  int w4_max_n_ = 0, w4_max_k_ = 0;
  // Prefill GEMMs of at least this many tokens dequantize the W4 matrix into w4_deq_ (sized for the largest
  // one) and run cuBLAS BF16; SPEAR_W4_DEQUANT_MIN_M overrides, 0 turns it off.
  int w4_dequant_min_m_ = 129;
  // The lm_head (bf16 weights, fp32 logits) of up to this many tokens runs dense_gemv_bf16 instead of cuBLAS
  // (SPEAR_GEMV_MAX_M, 0..8; 0: always cuBLAS). One: from two tokens on the kernel is bound by its shared-memory
  // reads of x (every 16 bytes of weights take two 16-byte loads per token), and cuBLAS streams the matrix faster.
  // On the H200 (bench/results/cuda-h200-gemv-maxm): decode at batch 8 1.54 -> 1.09 ms (1B shape), 4.94 -> 3.80 ms
  // (8B); at batch 1 the kernel and cuBLAS are within noise.
  int gemv_max_m_ = 1;
  size_t w4_max_weights_ = 0;
  DeviceBuffer w4_deq_;
  // The fused decode MLP block (mlp_fused.h): off unless SPEAR_FUSED_MLP=1 (measured slower than the op-by-op
  // path on the H200 so far: bench/results/cuda-h200-fusedmlp); its arrival counters (zeroed once).
  bool fused_mlp_on_ = false;
  bool rope_attn_on_ = true;
  bool tune_fused_ = true;
  bool tune_after_ = true;
  std::function<void()> last_w4_replay_;  // the last W4 launch noted, and the op count right after it
  uint64_t last_w4_ops_ = ~uint64_t(0);
  size_t rope_attn_launches_ = 0;
  DeviceBuffer mlp_counters_;
  int decode_fusion_mask_ = 0, decode_fusion_max_m_ = 1;
  DeviceBuffer fusion_counters_;  // the fused launches' arrival counters (w4a16_fusion_counter_bytes, zeroed once)
  size_t fused_linear_launches_ = 0, fused_ec_linear_launches_ = 0, deferred_ec_launches_ = 0;
  bool ec_defer_ = true, ec_defer_groups_ = false;
  int ec_defer_min_m_ = 2;
  int ec_swiglu_max_m_ = 1;
  size_t ec_swiglu_launches_ = 0;

  // The current batch (begin_batch): host arrays by address, their device copies.
  const BatchDesc* batch_ = nullptr;
  CudaKvCache* batch_cache_ = nullptr;
  DeviceBuffer batch_dev_;
  int32_t* batch_host_ = nullptr;  // pinned staging
  size_t batch_cap_ = 0;           // int32 elements
  int32_t *d_tokens_ = nullptr, *d_positions_ = nullptr, *d_token_seq_ = nullptr, *d_last_rows_ = nullptr;
  DevSeq* d_seqs_ = nullptr;
  int max_ctx_ = 0;
  DeviceBuffer scratch_ints_;
  bool capturing_ = false;
  ncclComm* comm_ = nullptr;  // set when the process group has more than one rank
  TpReduce tp_reduce_ = TpReduce::Auto;
  int64_t p2p_capacity_ = int64_t(1) << 20;  // bf16 elements per staging area (2 MB messages)
  uint64_t p2p_timeout_ns_ = 0;
  bool p2p_ = false;            // every rank's buffers are mapped: all_reduce_sum uses the P2P kernel
  P2pRankBuffers p2p_bufs_;     // this rank's
  P2pPeers p2p_peers_;          // every rank's, as seen from this device
  std::vector<void*> p2p_ipc_;  // peers' buffers opened with cudaIpcOpenMemHandle (closed in release_p2p)
  // The fused tail (TpReduce::Fused only): set up, released and mapped with the P2P buffers.
  int tail_max_h_ = kTpTailMaxH;  // SPEAR_TP_TAIL_MAX_H: the largest hidden size the staging takes
  bool tail_ = false;             // every rank's tail buffers are mapped: row_parallel_tail may run
  // SPEAR_TP_GEMM_PUSH=1: the row-parallel W4 GEMM's epilogue dual-writes its rows into the peers' tail staging
  // (fused tail only). Off by default: on 2 H200s it was 2-4% slower than the tail pushing them (8B decode).
  bool gemm_push_ = false;
  TpTailRankBuffers tail_bufs_;   // this rank's
  TpTailPeers tail_peers_;        // every rank's, as seen from this device

  std::unique_ptr<OpProfiler> prof_;
  std::map<const RopeTable*, DeviceBuffer> rope_tables_;
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    Tensor out;
    int runs = 0;              // the first run is eager (lazy initialisations), the second captures
    bool eager_only = false;   // a prefill body that could not be captured: runs eagerly from then on
    uint64_t last_use = 0;     // graph_clock_ at the last run, for evicting prefill graphs
  };
  using GraphMap = std::map<std::pair<uint64_t, uint64_t>, Graph>;  // (KV cache id, key)
  GraphMap graphs_;
  GraphMap::iterator erase_graph(GraphMap::iterator it);  // destroys its exec
  // Prefill (and mixed) iterations as graphs (SPEAR_PREFILL_GRAPHS=0: eager): at most prefill_graph_cap_ shapes
  // (SPEAR_PREFILL_GRAPH_CAP) are kept, the least recently run dropped first, since a server sees many token counts.
  bool prefill_graphs_ = true;
  int prefill_graph_cap_ = 32;
  uint64_t graph_clock_ = 0;
  // Drops the least recently run prefill graph while `prefill_graph_cap_` or more are kept.
  void evict_prefill_graphs();
};

}  // namespace spear::cuda
