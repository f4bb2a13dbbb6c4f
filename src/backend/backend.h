#pragma once
// The backend interface: the ops a decoder forward pass needs, declared once and implemented per device
// (backend/cpu, backend/cuda). Ops take tensors and sizes and know nothing of models or requests.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/ec_dispatch.h"
#include "core/error.h"
#include "core/tensor.h"
#include "parallel/process_group.h"

namespace spear {
struct PackedQuantWeights;
struct Compensator;
}

namespace spear {

// A linear layer's weights as loaded from a checkpoint, on the host, fp32: y = x·Wᵀ + b.
struct LinearWeights {
  std::string name;  // e.g. "model.layers.3.self_attn.q_proj"
  int out_features = 0, in_features = 0;
  std::vector<float> w;     // [out_features, in_features]
  std::vector<float> bias;  // [out_features] or empty
};

// A backend's own representation of a linear layer (dense here; quantized kinds come with the quant layer).
class Linear {
 public:
  virtual ~Linear() = default;
  int in_features = 0, out_features = 0;
  std::string name;
  virtual size_t weight_bytes() const = 0;
};

// One sequence's new tokens inside a flattened batch: rows [token_begin, token_begin + n_tokens) of the
// activations are its tokens at absolute positions pos0 .. pos0 + n_tokens - 1; its keys and values live in
// KV-cache slot kv_slot.
struct SeqSlice {
  int token_begin = 0;
  int n_tokens = 0;
  int pos0 = 0;
  int kv_slot = 0;
};

struct AttentionParams {
  int layer = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int window = 0;  // sliding window in tokens (query attends to keys with pos > p - window); 0 = unlimited
  float scale = 1.f;
  bool kv_appended = false;  // k and v of this step are already in the cache (Backend::rope_qk returned true)
};

// Rotary embedding frequencies, one per pair of dimensions (head_dim / 2), already scaled (llama3/linear).
struct RopeTable {
  std::vector<float> inv_freq;
};

// What one forward pass computes on, described once before its ops run (Model::embed builds it). A GPU backend
// uploads it in one copy and its kernels read it from device memory, so a decode step can be a replayed graph.
// The ops below still take spans; a backend recognises these arrays by address.
struct BatchDesc {
  std::vector<int32_t> tokens;     // [T]
  std::vector<int32_t> positions;  // [T] absolute position of each token
  std::vector<int32_t> token_seq;  // [T] index into seqs of each token's sequence
  std::vector<int32_t> last_rows;  // [n_seqs] row of each sequence's last token
  std::vector<SeqSlice> seqs;
  bool decode_only() const {
    for (const SeqSlice& s : seqs)
      if (s.n_tokens != 1) return false;
    return !seqs.empty();
  }
};

// run_graph keys: a decode step's is its number of sequences; a prefill or mixed iteration's carries
// kPrefillGraphKey over its tokens and sequences (fewer than 2^24).
inline constexpr uint64_t kPrefillGraphKey = uint64_t(1) << 63;
constexpr uint64_t prefill_graph_key(size_t tokens, size_t seqs) {
  return kPrefillGraphKey | uint64_t(tokens) << 24 | uint64_t(seqs);
}
constexpr bool is_prefill_graph_key(uint64_t key) { return (key & kPrefillGraphKey) != 0; }

class KvCache {
 public:
  virtual ~KvCache() = default;
  virtual int num_slots() const = 0;
  virtual int max_tokens() const = 0;  // per slot
  virtual size_t bytes() const = 0;
};

// How a GPU backend sums tensors over its tensor-parallel ranks (Backend::set_tp_reduce).
//   Auto: the P2P dual-write kernel (backend/cuda/p2p_reduce.h) for tensors that fit its staging buffers, when
//         every pair of the group's GPUs has peer access; NCCL for larger tensors, and for all of them otherwise.
//   P2p:  the same, but a group whose GPUs cannot all reach each other fails at setup instead of using NCCL only.
//   Nccl: NCCL only.
//   Fused: P2p, plus the fused tail (Backend::row_parallel_tail) for row-parallel outputs of up to 64 tokens: the
//         reduction, compensator, residual add and next RMSNorm in one launch. Opt-in while untested on 2 GPUs.
enum class TpReduce { Auto, Nccl, P2p, Fused };

inline const char* tp_reduce_name(TpReduce r) {
  switch (r) {
    case TpReduce::Nccl:
      return "nccl";
    case TpReduce::P2p:
      return "p2p";
    case TpReduce::Fused:
      return "fused";
    default:
      return "auto";
  }
}

// "auto" | "nccl" | "p2p" | "fused"; throws spear::Error naming `what` (an option or variable) otherwise.
inline TpReduce parse_tp_reduce(const std::string& s, const std::string& what) {
  for (TpReduce r : {TpReduce::Auto, TpReduce::Nccl, TpReduce::P2p, TpReduce::Fused})
    if (s == tp_reduce_name(r)) return r;
  fail("{}: unknown tensor-parallel reduction '{}' (auto, nccl, p2p or fused)", what, s);
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  // True when independent forward passes (separate KV caches) may run concurrently on host threads, each
  // with single-threaded ops; batch evaluation (perplexity) then parallelises over sequences instead.
  virtual bool concurrent_forwards() const { return false; }

  virtual Tensor alloc(int64_t rows, int64_t cols) = 0;  // activation buffer, contents undefined
  // An fp32 buffer (logits): the CPU's activations are fp32 already; a GPU's are bf16.
  virtual Tensor alloc_f32(int64_t rows, int64_t cols) { return alloc(rows, cols); }
  virtual Tensor upload(const float* host, int64_t rows, int64_t cols) = 0;
  virtual void download(const Tensor& t, float* host) = 0;  // copies to fp32 host memory
  virtual void download_i32(const Tensor& t, int32_t* host) = 0;  // an I32 tensor (argmax_rows' ids)
  // Called before the ops of a forward pass (GPU: upload `d`, map KV pages for every token).
  virtual void begin_batch(const BatchDesc& d, KvCache& cache) {
    (void)d;
    (void)cache;
  }
  // Runs `body` (ops only, no host transfers) and returns its output tensor. A GPU backend runs it eagerly the
  // first time it sees `key` with the KV cache of the last begin_batch, captures it as a CUDA graph the second
  // time, and replays it afterwards: same shapes, new BatchDesc contents. Keys with kPrefillGraphKey set are
  // prefill (or mixed) shapes, which a backend may keep fewer of or run eagerly.
  virtual Tensor run_graph(uint64_t key, const std::function<Tensor()>& body) {
    (void)key;
    return body();
  }
  virtual std::unique_ptr<Linear> make_linear(const LinearWeights& w) = 0;
  // A quantized linear layer from the package layout (converted to the backend's own layout here).
  virtual std::unique_ptr<Linear> make_quant_linear(const std::string& name, const PackedQuantWeights& w,
                                                    const std::vector<float>& bias) = 0;
  // A dense linear layer's weight [out, in] as a tensor sharing its memory (tied embeddings read the
  // lm_head's weights instead of keeping a second copy). The Linear must outlive the tensor.
  virtual Tensor dense_weight_tensor(const Linear& l) = 0;
  // Attaches an error compensator to a linear layer (nullptr detaches): linear() then adds B·(g ⊙ A·x).
  virtual void set_compensator(Linear& l, const Compensator* c) = 0;
  // The attached compensator's {rank, gate width}; {0, 0} without one.
  virtual std::pair<int, int> compensator_shape(const Linear& l) const = 0;
  virtual std::unique_ptr<KvCache> make_kv_cache(int n_layers, int n_slots, int max_tokens, int kv_dim) = 0;

  // Tensor parallelism (DESIGN.md §5): the group whose rank this backend is, set before Model::load so that
  // the model loads its shard. A GPU backend sets up its collectives here (collective: every rank calls it).
  virtual void set_process_group(std::shared_ptr<ProcessGroup> pg) { pg_ = std::move(pg); }
  // How all_reduce_sum reduces (TpReduce above); backends with a single way (the CPU's TCP star) ignore it.
  // Must come before set_process_group, which sets the chosen path up.
  virtual void set_tp_reduce(TpReduce r) { (void)r; }
  // What all_reduce_sum does under the current group, for reports: "none" on one rank; on the GPU "nccl",
  // "p2p (≤ N elements) + nccl" or "p2p (≤ N elements) + fused tail (≤ 64 rows) + nccl".
  virtual std::string tp_reduce_description() const { return tp_size() > 1 ? "tcp" : "none"; }
  ProcessGroup* process_group() const { return pg_.get(); }
  int tp_size() const { return pg_ ? pg_->size() : 1; }
  int tp_rank() const { return pg_ ? pg_->rank() : 0; }
  // Sums each tensor over the group's ranks in place; every rank ends with the same values. One call may
  // reduce tensors of different dtypes (a row-parallel output and its compensator's partial A·x).
  virtual void all_reduce_sum(std::span<Tensor* const> ts) = 0;
  // full[rows, size · part.cols] = the ranks' parts side by side, rank r's at columns [r · cols, (r + 1) · cols):
  // the vocab-parallel lm_head's logits (fp32). Every rank gets the whole.
  virtual void all_gather_cols(const Tensor& part, Tensor& full) = 0;
  // A row-parallel compensated linear in two halves around that all-reduce, since its gate needs the full
  // A·x (DESIGN.md §2): linear_ec_partial computes out = x·Wᵀ (+ bias) without the compensator and
  // z[T, rank] = A·x (fp32, from alloc_f32); after both are summed over the ranks, ec_expand adds
  // B·(g(z) ⊙ z) to out.
  virtual void linear_ec_partial(const Tensor& x, const Linear& l, Tensor& out, Tensor& z) = 0;
  virtual void ec_expand(const Tensor& z, const Linear& l, Tensor& out) = 0;
  // The fused tail of a row-parallel linear, where the backend has one (DESIGN.md §5): the GEMM of this rank's
  // shard without its compensator, then one step that sums the partial outputs over the ranks (with the
  // compensator's partial z, its gate and B when one is attached), adds the sum into the residual stream x and
  // writes h = rms_norm(x)·norm_w. Returns false, having done nothing, where it cannot (too many tokens, no
  // peer-to-peer path); the caller then reduces and normalises op by op.
  virtual bool row_parallel_tail(const Tensor& in, const Linear& l, Tensor& x, const Tensor& norm_w, float eps,
                                 Tensor& h) {
    (void)in, (void)l, (void)x, (void)norm_w, (void)eps, (void)h;
    return false;
  }

  // One device: x += l(in); h = rms_norm(x)·norm_w, where the backend does it better than linear then add_rms_norm
  // (CUDA: a compensated W4 linear at a few tokens, its GEMM launch plain and its whole EC term, B·(g ⊙ A·in), computed
  // by the norm launch). Returns false, having done nothing, elsewhere; the caller then runs the ops.
  virtual bool linear_residual_norm(const Tensor& in, const Linear& l, Tensor& x, const Tensor& norm_w, float eps,
                                    Tensor& h) {
    (void)in, (void)l, (void)x, (void)norm_w, (void)eps, (void)h;
    return false;
  }

  // One device: gate_out = silu(gate(in)) ⊙ up(in) (up_out receives up(in)), where the backend does it better than
  // linear_group then swiglu (CUDA: a compensated gate / up pair at a few tokens, its GEMM launch plain with g ⊙ z
  // computed beside it, the EC terms added by the SwiGLU launch). Returns false, having done nothing, elsewhere; the
  // caller then runs the ops.
  virtual bool linear_swiglu(const Tensor& in, const Linear& gate, const Linear& up, Tensor& gate_out,
                             Tensor& up_out) {
    (void)in, (void)gate, (void)up, (void)gate_out, (void)up_out;
    return false;
  }

  // The MLP block of a decode step in one go, where the backend has a fused kernel for it:
  //   x += add;  h = rms_norm(x)·norm_w;  x += down(silu(gate(h)) ⊙ up(h))
  // with the roundings of the op-by-op path. Returns false, having done nothing, where it cannot (no kernel for
  // these linears or this many tokens); the caller then runs the ops.
  virtual bool fused_mlp(Tensor& x, const Tensor& add, const Tensor& norm_w, float eps, const Linear& gate,
                         const Linear& up, const Linear& down) {
    (void)x, (void)add, (void)norm_w, (void)eps, (void)gate, (void)up, (void)down;
    return false;
  }

  // Decode-step fusions of a linear (or of linears that share their input) with the residual add after it and the
  // element-wise step that follows, where the backend has them (the CUDA W4 decode kernels, a few tokens):
  //   residual:   outs[i] += the product                            (outs[i]: the residual stream)
  //   norm_out:   then norm_out = rms_norm(outs[0])·norm_w           (one linear: the next linear's input)
  //   swiglu_out: outs = gate, up projections; swiglu_out = silu(outs[0]) ⊙ outs[1] (may be outs[0])
  // with the roundings of the op-by-op path (linear, add, rms_norm / swiglu). Returns false, having done nothing,
  // where it cannot (no such kernel for these linears, compensators, too many tokens); the caller then runs the ops.
  struct LinearFusion {
    bool residual = false;
    const Tensor* norm_w = nullptr;
    float eps = 0.f;
    Tensor* norm_out = nullptr;
    Tensor* swiglu_out = nullptr;
  };
  virtual bool linear_fused(const Tensor& in, std::span<const Linear* const> ls, std::span<Tensor* const> outs,
                            const LinearFusion& f) {
    (void)in, (void)ls, (void)outs, (void)f;
    return false;
  }

  // How compensated linears run (backends with several EC implementations: CUDA; the CPU has one path and
  // ignores these). A forced path applies to every compensated linear (benchmarks); Auto consults the
  // dispatch table (null: the built-in rule). verbose: report each dispatch decision once on stderr.
  virtual void set_ec_path(EcPath p) { (void)p; }
  virtual void set_ec_dispatch(std::shared_ptr<const EcDispatchTable> t) { (void)t; }
  virtual void set_verbose(bool v) { (void)v; }
  // Whether run_graph captures prefill keys (GPU; default on). Serving turns it off: its iterations come in many
  // (tokens, sequences) shapes, each would be captured at its second run, and its latency table is measured
  // eagerly. Every tensor-parallel rank must choose alike (a capture records the collectives without running them).
  virtual void set_prefill_graphs(bool on) { (void)on; }
  // Times linear(x, l) with its compensator at each token count under every EC path the backend can run
  // there (µs per call, median of reps), cycling over the linears `ls` of one shape as a decode step does (a
  // CUDA graph on the GPU): what `spear tune` writes the dispatch table from. Empty when the backend has a
  // single path.
  struct EcTiming {
    int m = 0;
    std::map<EcPath, double> us;
    double base_us = 0;  // the linear alone, without its compensator (0: not measured)
  };
  virtual std::vector<EcTiming> time_ec_paths(std::span<const Linear* const> ls, std::span<const int> tokens,
                                               int reps) {
    (void)ls, (void)tokens, (void)reps;
    return {};
  }

  // out[i] = table[ids[i]]: embedding lookup, and picking rows of a batch (e.g. last token per sequence)
  virtual void gather_rows(const Tensor& table, std::span<const int32_t> ids, Tensor& out) = 0;
  // out = x / sqrt(mean(x²) + eps) * w, per row; w [1, d]. out may alias x.
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // out[T, out_features] = x[T, in_features]·Wᵀ + b
  virtual void linear(const Tensor& x, const Linear& w, Tensor& out) = 0;
  // outs[i][T, out_i] = x·Wᵢᵀ for linears that share their input (q/k/v, gate/up); backends that can run them
  // as one launch override this.
  virtual void linear_group(const Tensor& x, std::span<const Linear* const> ls, std::span<Tensor* const> outs) {
    for (size_t i = 0; i < ls.size(); ++i) linear(x, *ls[i], *outs[i]);
  }
  // In-place rotary embedding of x [T, n_heads * head_dim] (rotate-half convention of HF Llama).
  virtual void rope(Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
                    const RopeTable& table) = 0;
  // RoPE of q and k before attention (in place). A backend may also append k and v to the cache here (one
  // launch on the GPU) and return true; the caller then sets AttentionParams::kv_appended so that attention
  // does not append them again.
  virtual bool rope_qk(Tensor& q, Tensor& k, const Tensor& v, int n_heads, int n_kv_heads, int head_dim,
                       std::span<const int32_t> positions, const RopeTable& table, KvCache& cache, int layer) {
    (void)v, (void)cache, (void)layer;
    rope(q, n_heads, head_dim, positions, table);
    rope(k, n_kv_heads, head_dim, positions, table);
    return false;
  }
  // RoPE of q and k, the KV append and attention as one step, where the backend has such a path for this batch (the
  // CUDA decode kernel); q and k are then left unrotated. False: nothing done, the caller runs rope_qk and attention.
  virtual bool rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const int32_t> positions,
                              const RopeTable& table, std::span<const SeqSlice> seqs, KvCache& cache,
                              const AttentionParams& p, Tensor& out) {
    (void)q, (void)k, (void)v, (void)positions, (void)table, (void)seqs, (void)cache, (void)p, (void)out;
    return false;
  }
  // Appends k, v [T, kv_dim] to the cache (unless p.kv_appended) and computes causal (optionally windowed) GQA attention of
  // q [T, n_heads * head_dim] for every sequence slice; out [T, n_heads * head_dim].
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const SeqSlice> seqs,
                         KvCache& cache, const AttentionParams& p, Tensor& out) = 0;
  // out = silu(gate) * up
  virtual void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // x += y
  virtual void add(Tensor& x, const Tensor& y) = 0;
  // x += y, then out = rms_norm(x): the residual add and the next norm (one launch on the GPU). out != x.
  virtual void add_rms_norm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) {
    add(x, y);
    rms_norm(x, w, eps, out);
  }
  // ids[r] = argmax_c x[r, c] (first on ties); ids is [rows, 1] I32 from alloc_ids().
  virtual void argmax_rows(const Tensor& x, Tensor& ids) = 0;
  virtual Tensor alloc_ids(int64_t rows) = 0;

 protected:
  std::shared_ptr<ProcessGroup> pg_;
};

}  // namespace spear
