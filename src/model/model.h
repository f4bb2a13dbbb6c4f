#pragma once
// A decoder-only transformer of the Llama family (Llama, Qwen2, Mistral): pre-norm blocks of GQA attention
// with RoPE and a SwiGLU MLP. Hyper-parameters come from the per-architecture parsers (arch_*.cpp); the
// forward pass is written once against the Backend interface.
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/hf_config.h"
#include "quant/package.h"

namespace spear {

// Observes activations during a forward pass: every linear module's input and output (module names as in
// the checkpoint, e.g. "model.layers.3.mlp.down_proj"), each block's output ("model.layers.3") and the
// final normalised hidden state ("model.norm"). The tensor lives on the backend's device.
enum class TapPoint { Input, Output };
using TapFn = std::function<void(const std::string& module, TapPoint point, const Tensor& t)>;

struct DecoderLayer {
  Tensor attn_norm, mlp_norm;  // [1, hidden]
  std::unique_ptr<Linear> q, k, v, o, gate, up, down;
  std::vector<Linear*> linears() const { return {q.get(), k.get(), v.get(), o.get(), gate.get(), up.get(), down.get()}; }
};

// Which rows of logits a forward pass returns.
enum class LogitsMode { All, LastPerSeq, None };

struct Batch {
  std::vector<int32_t> tokens;  // all new tokens, sequence after sequence
  std::vector<SeqSlice> seqs;
  static Batch single(std::span<const int32_t> tokens, int pos0, int kv_slot = 0);
};

struct LoadOptions {
  bool compensators = true;  // attach a package's error compensators (false: its plain quantized model)
};

class Model {
 public:
  // Loads a Hugging Face checkpoint directory (or a SPEAR package) onto the backend.
  static std::unique_ptr<Model> load(const std::string& dir, Backend& backend, const LoadOptions& opts = {});

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() { return backend_; }
  std::vector<DecoderLayer>& layers() { return layers_; }
  Linear& lm_head() { return *lm_head_; }
  // The slot of a decoder linear by its checkpoint name ("model.layers.3.mlp.down_proj"), so calibration can
  // swap a layer's implementation; throws for unknown names.
  std::unique_ptr<Linear>& linear_slot(const std::string& module);
  // Every decoder linear in forward order (layer by layer: q, k, v, o, gate, up, down), with [out, in].
  std::vector<std::string> linear_names() const;
  std::map<std::string, std::pair<int, int>> linear_dims() const;
  // Compensators attached at load from the package (module names), for reports.
  const std::vector<std::string>& compensated_modules() const { return compensated_; }
  // Attaches a compensator given for a whole decoder linear (c.module names it); under tensor parallelism this
  // rank keeps its part (model/tensor_parallel.h). Throws for unknown modules or mismatched shapes.
  void attach_compensator(const Compensator& c);

  // Tensor parallelism (the backend's process group, set before load): this rank's share of the attention
  // heads and of the MLP width; everything when size == 1.
  struct Shard {
    int rank = 0, size = 1;
    int heads = 0, kv_heads = 0, intermediate = 0;
    bool vocab_split = false;  // the lm_head holds rows [rank · V/size, ...) and the logits are gathered
  };
  const Shard& shard() const { return shard_; }

  // Serving under tensor parallelism: requests reach rank 0 only, so rank 0 leads (every KV cache it makes and
  // every forward pass it runs is first sent to the other ranks) and the others follow: follow() replays them
  // until the leader's model is destroyed. Commands whose every rank computes the same (generate, ppl, bench)
  // need neither. model/tp_lead.cpp.
  void lead();
  void follow();
  ~Model();

  std::unique_ptr<KvCache> make_kv_cache(int n_slots, int max_tokens);

  // Runs the batch, appending its keys and values to `cache`. Returns fp32 logits on the host,
  // [rows, vocab]: every token (All) or the last token of each sequence (LastPerSeq).
  std::vector<float> forward(const Batch& batch, KvCache& cache, LogitsMode mode, const TapFn* taps = nullptr);
  // The greedy next token of each sequence (argmax of its last token's logits, computed on the device). A
  // decode-only batch (one new token per sequence) runs as a replayed CUDA graph on the GPU backend.
  std::vector<int32_t> forward_greedy(const Batch& batch, KvCache& cache);

  // The same pass in pieces, for layer-by-layer calibration (GPTQ, error compensators):
  // embed -> run_layer(0..L-1) -> logits. `x` is the residual stream [tokens, hidden] on the backend.
  Tensor embed(const Batch& batch);
  void run_layer(int layer, Tensor& x, const Batch& batch, KvCache& cache, const TapFn* taps = nullptr);
  std::vector<float> logits(const Tensor& x, const Batch& batch, LogitsMode mode, const TapFn* taps = nullptr);

  size_t parameter_count() const { return n_params_; }
  // The package manifest when loaded from a quantized package.
  const std::optional<PackageManifest>& package() const { return package_; }
  size_t weight_bytes() const;

 private:
  Model(ModelConfig cfg, Backend& backend) : cfg_(std::move(cfg)), backend_(backend) {}
  ModelConfig cfg_;
  Backend& backend_;
  Tensor embed_;       // [vocab, hidden]
  Tensor final_norm_;  // [1, hidden]
  std::unique_ptr<Linear> lm_head_;
  std::vector<DecoderLayer> layers_;
  RopeTable rope_;
  size_t n_params_ = 0;
  std::optional<PackageManifest> package_;
  std::vector<std::string> compensated_;
  Shard shard_;
  std::shared_ptr<struct TpLead> lead_;  // set by lead()

  std::unique_ptr<KvCache> make_local_kv_cache(int n_slots, int max_tokens);
  std::vector<float> forward_local(const Batch& batch, KvCache& cache, LogitsMode mode, const TapFn* taps);
  std::vector<int32_t> forward_greedy_local(const Batch& batch, KvCache& cache);

  void check_batch(const Batch& batch, const KvCache& cache) const;
  BatchDesc describe(const Batch& batch) const;
  // The pass on a described batch (begin_batch already called): what embed/run_layer/logits do.
  Tensor embed_tokens(std::span<const int32_t> tokens);
  // residual: when given (and no taps), the layer's last residual add is left to the caller as *residual
  // (x + *residual is the layer's output), and a non-empty *residual on entry is added first: each add then
  // runs fused with the norm that follows it (Backend::add_rms_norm), the next layer's or the final one.
  // normed: under tensor parallelism, a layer whose down_proj ran the backend's fused tail (row_parallel_tail)
  // has already added its output into x and normalised x for the next layer (or the final norm): *normed is that
  // normalised input, which the next step takes instead of computing its norm.
  void run_layer_desc(int layer, Tensor& x, const BatchDesc& d, KvCache& cache, const TapFn* taps,
                      Tensor* residual = nullptr, Tensor* normed = nullptr);
  Tensor logits_desc(Tensor& x, const BatchDesc& d, LogitsMode mode, const TapFn* taps, Tensor* residual = nullptr,
                     Tensor* normed = nullptr);
  // A row-parallel linear (o, down): the partial products summed over the ranks, a compensator's z before its
  // gate (DESIGN.md §2). Just the linear without tensor parallelism.
  void row_parallel_linear(const Linear& l, const Tensor& in, Tensor& out);
  void require_single_rank(const char* what) const;
};

// Per-architecture registry (model/architectures.cpp) and the model config loader that uses it.
const std::vector<ArchSpec>& supported_architectures();
ModelConfig load_config(const std::string& dir);

// RoPE inverse frequencies for a config, with its scaling applied, rounded to `round_to` (the checkpoint's
// dtype, as transformers does; F32 = no rounding). model/rope.cpp.
RopeTable make_rope_table(const RopeConfig& rope, int head_dim, DType round_to);

}  // namespace spear
