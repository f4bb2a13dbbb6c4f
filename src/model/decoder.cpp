// Loading and the forward pass shared by every Llama-family architecture.
#include <cmath>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/tensor_parallel.h"
#include "quant/package.h"

namespace spear {

Batch Batch::single(std::span<const int32_t> tokens, int pos0, int kv_slot) {
  Batch b;
  b.tokens.assign(tokens.begin(), tokens.end());
  b.seqs.push_back({0, int(tokens.size()), pos0, kv_slot});
  return b;
}

namespace {

void check_shape(const TensorView& t, std::vector<int64_t> want) {
  if (t.shape != want) {
    TensorView w;
    w.shape = want;
    fail("{}: tensor '{}' has shape {}, the config implies {}", t.file, t.name, t.shape_str(), w.shape_str());
  }
}

LinearWeights read_linear(const Checkpoint& ck, const std::string& name, int out, int in, bool bias) {
  LinearWeights w;
  w.name = name;
  w.out_features = out;
  w.in_features = in;
  const TensorView& t = ck.get(name + ".weight");
  check_shape(t, {out, in});
  w.w = t.to_f32();
  if (bias) {
    const TensorView& b = ck.get(name + ".bias");
    check_shape(b, {out});
    w.bias = b.to_f32();
  }
  return w;
}

Tensor read_vector(Backend& be, const Checkpoint& ck, const std::string& name, int n) {
  const TensorView& t = ck.get(name);
  check_shape(t, {n});
  auto v = t.to_f32();
  return be.upload(v.data(), 1, n);
}

}  // namespace

ModelConfig load_config(const std::string& dir) { return load_model_config(dir, supported_architectures()); }

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& be, const LoadOptions& opts) {
  ModelConfig cfg = load_config(dir);
  Checkpoint ck(dir);
  std::unique_ptr<Model> m(new Model(cfg, be));
  // A package holds some linears as packed codes (<module>.qweight); everything else reads as a checkpoint.
  const bool package = is_package(dir);
  if (package) m->package_ = read_manifest(dir);
  const int H = cfg.hidden_size, I = cfg.intermediate_size, V = cfg.vocab_size;
  Shard& sh = m->shard_;
  sh.rank = be.tp_rank();
  sh.size = be.tp_size();
  for (auto [what, n] : {std::pair<const char*, int>{"attention heads", cfg.num_heads},
                         {"key/value heads", cfg.num_kv_heads},
                         {"MLP features (intermediate_size)", I}})
    if (n % sh.size != 0)
      fail("{}: {} {} do not split over {} tensor-parallel ranks", dir, n, what, sh.size);
  sh.heads = cfg.num_heads / sh.size;
  sh.kv_heads = cfg.num_kv_heads / sh.size;
  sh.intermediate = I / sh.size;

  // The lm_head is the largest matrix a decode step reads: split over the vocabulary when it divides. Tied
  // embeddings then keep a whole copy for the lookup, since a rank's lm_head rows are only part of the table.
  sh.vocab_split = sh.size > 1 && V % sh.size == 0;

  const TensorView& emb = ck.get("model.embed_tokens.weight");
  check_shape(emb, {V, H});
  std::vector<float> emb_f = emb.to_f32();
  if (!cfg.tie_word_embeddings || sh.vocab_split) m->embed_ = be.upload(emb_f.data(), V, H);
  m->final_norm_ = read_vector(be, ck, "model.norm.weight", H);
  m->n_params_ = size_t(V) * H + H;

  ProgressBar bar("loading " + dir, cfg.num_layers);
  m->layers_.resize(size_t(cfg.num_layers));
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayer& L = m->layers_[size_t(i)];
    L.attn_norm = read_vector(be, ck, p + "input_layernorm.weight", H);
    L.mlp_norm = read_vector(be, ck, p + "post_attention_layernorm.weight", H);
    // Reads the whole module, counts its parameters, keeps this rank's shard (model/tensor_parallel.h).
    auto lin = [&](const std::string& n, int out, int in, bool bias) -> std::unique_ptr<Linear> {
      const std::string name = p + n;
      const ShardKind kind = shard_kind_of(name);
      if (package && ck.has(name + ".qweight")) {
        PackedQuantWeights q = read_quantized_linear(ck, *m->package_, name, out, in);
        std::vector<float> b;
        if (bias) {
          const TensorView& bt = ck.get(name + ".bias");
          check_shape(bt, {out});
          b = bt.to_f32();
        }
        m->n_params_ += size_t(out) * in + b.size();
        return be.make_quant_linear(name, shard_quant(name, q, kind, sh.rank, sh.size),
                                    shard_bias(b, kind, sh.rank, sh.size));
      }
      if (package && !ck.has(name + ".weight"))
        fail("{}: package has neither '{}.qweight' nor '{}.weight'", dir, name, name);
      LinearWeights w = read_linear(ck, name, out, in, bias);
      m->n_params_ += w.w.size() + w.bias.size();
      return be.make_linear(shard_linear(w, kind, sh.rank, sh.size));
    };
    L.q = lin("self_attn.q_proj", cfg.q_dim(), H, cfg.qkv_bias);
    L.k = lin("self_attn.k_proj", cfg.kv_dim(), H, cfg.qkv_bias);
    L.v = lin("self_attn.v_proj", cfg.kv_dim(), H, cfg.qkv_bias);
    L.o = lin("self_attn.o_proj", H, cfg.q_dim(), cfg.o_bias);
    L.gate = lin("mlp.gate_proj", I, H, cfg.mlp_bias);
    L.up = lin("mlp.up_proj", I, H, cfg.mlp_bias);
    L.down = lin("mlp.down_proj", H, I, cfg.mlp_bias);
    m->n_params_ += 2 * size_t(H);
    bar.update(i + 1);
  }
  bar.finish();

  LinearWeights head;
  head.name = "lm_head";
  head.out_features = V;
  head.in_features = H;
  if (cfg.tie_word_embeddings) {
    head.w = std::move(emb_f);
  } else {
    if (!ck.has("lm_head.weight"))
      fail("{}: tie_word_embeddings is false but the checkpoint has no 'lm_head.weight'", dir);
    const TensorView& t = ck.get("lm_head.weight");
    check_shape(t, {V, H});
    head.w = t.to_f32();
    m->n_params_ += head.w.size();
  }
  m->lm_head_ = be.make_linear(sh.vocab_split ? shard_linear(head, ShardKind::OutRows, sh.rank, sh.size) : head);
  if (cfg.tie_word_embeddings && !sh.vocab_split) m->embed_ = be.dense_weight_tensor(*m->lm_head_);  // one copy
  m->rope_ = make_rope_table(cfg.rope, cfg.head_dim, cfg.dtype);
  if (package && opts.compensators && !m->package_->compensators.empty()) {
    for (const Compensator& c : read_compensators(dir, *m->package_, m->linear_dims())) {
      m->attach_compensator(c);
      m->n_params_ += c.param_count();
      m->compensated_.push_back(c.module);
    }
  }
  return m;
}

namespace {
const char* kLinearSuffixes[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
}

std::unique_ptr<Linear>& Model::linear_slot(const std::string& module) {
  const std::string pre = "model.layers.";
  if (module.compare(0, pre.size(), pre) == 0) {
    size_t dot = module.find('.', pre.size());
    if (dot != std::string::npos) {
      int li = -1;
      try {
        li = std::stoi(module.substr(pre.size(), dot - pre.size()));
      } catch (...) {
      }
      if (li >= 0 && li < cfg_.num_layers) {
        DecoderLayer& L = layers_[size_t(li)];
        const std::string suf = module.substr(dot + 1);
        std::unique_ptr<Linear>* slots[] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
        for (int i = 0; i < 7; ++i)
          if (suf == kLinearSuffixes[i]) return *slots[i];
      }
    }
  }
  fail("no linear module named '{}' in this model", module);
}

std::vector<std::string> Model::linear_names() const {
  std::vector<std::string> names;
  for (int li = 0; li < cfg_.num_layers; ++li)
    for (const char* s : kLinearSuffixes) names.push_back("model.layers." + std::to_string(li) + "." + s);
  return names;
}

// From the config, not the linears: under tensor parallelism those hold one rank's shard.
std::map<std::string, std::pair<int, int>> Model::linear_dims() const {
  const int H = cfg_.hidden_size, I = cfg_.intermediate_size;
  const std::pair<int, int> dims[] = {{cfg_.q_dim(), H}, {cfg_.kv_dim(), H}, {cfg_.kv_dim(), H}, {H, cfg_.q_dim()},
                                      {I, H},            {I, H},            {H, I}};
  std::map<std::string, std::pair<int, int>> d;
  for (int li = 0; li < cfg_.num_layers; ++li)
    for (int i = 0; i < 7; ++i) d["model.layers." + std::to_string(li) + "." + kLinearSuffixes[i]] = dims[i];
  return d;
}

void Model::attach_compensator(const Compensator& c) {
  Linear& l = *linear_slot(c.module);
  const auto dims = linear_dims().at(c.module);
  if (c.out != dims.first || c.in != dims.second)
    fail("{}: compensator is [{} -> {}], the module [{} -> {}]", c.module, c.in, c.out, dims.second, dims.first);
  const Compensator part = shard_compensator(c, shard_kind_of(c.module), shard_.rank, shard_.size);
  backend_.set_compensator(l, &part);
}

std::unique_ptr<KvCache> Model::make_local_kv_cache(int n_slots, int max_tokens) {
  return backend_.make_kv_cache(cfg_.num_layers, n_slots, max_tokens, shard_.kv_heads * cfg_.head_dim);
}

size_t Model::weight_bytes() const {
  size_t n = (cfg_.tie_word_embeddings ? 0 : embed_.nbytes()) + final_norm_.nbytes() + lm_head_->weight_bytes();
  for (const auto& L : layers_) {
    n += L.attn_norm.nbytes() + L.mlp_norm.nbytes();
    for (const Linear* l : L.linears()) n += l->weight_bytes();
  }
  return n;
}

void Model::check_batch(const Batch& batch, const KvCache& cache) const {
  const int T = int(batch.tokens.size());
  for (const SeqSlice& s : batch.seqs) {
    if (s.token_begin < 0 || s.n_tokens < 0 || s.token_begin + s.n_tokens > T) fail("forward: bad sequence slice");
    if (s.kv_slot < 0 || s.kv_slot >= cache.num_slots()) fail("forward: KV slot {} out of range", s.kv_slot);
    if (s.pos0 + s.n_tokens > cache.max_tokens())
      fail("sequence of {} tokens exceeds the context capacity of {} tokens", s.pos0 + s.n_tokens, cache.max_tokens());
  }
  for (int32_t id : batch.tokens)
    if (id < 0 || id >= cfg_.vocab_size) fail("token id {} is outside the vocabulary [0, {})", id, cfg_.vocab_size);
}

BatchDesc Model::describe(const Batch& batch) const {
  BatchDesc d;
  d.tokens = batch.tokens;
  d.seqs = batch.seqs;
  d.positions.resize(batch.tokens.size());
  d.token_seq.resize(batch.tokens.size());
  for (size_t si = 0; si < batch.seqs.size(); ++si) {
    const SeqSlice& s = batch.seqs[si];
    for (int i = 0; i < s.n_tokens; ++i) {
      d.positions[size_t(s.token_begin + i)] = s.pos0 + i;
      d.token_seq[size_t(s.token_begin + i)] = int32_t(si);
    }
    d.last_rows.push_back(s.token_begin + s.n_tokens - 1);
  }
  return d;
}

// The gather reads only the tokens: no KV pages are touched, so no batch description is needed.
Tensor Model::embed(const Batch& batch) { return embed_tokens(batch.tokens); }

// On the GPU, tokens from the current BatchDesc are read from its device copy (graph-safe).
Tensor Model::embed_tokens(std::span<const int32_t> tokens) {
  Tensor x = backend_.alloc(int64_t(tokens.size()), cfg_.hidden_size);
  backend_.gather_rows(embed_, tokens, x);
  return x;
}

void Model::require_single_rank(const char* what) const {
  if (shard_.size > 1) fail("{} does not run under tensor parallelism (--tp 1)", what);
}

void Model::row_parallel_linear(const Linear& l, const Tensor& in, Tensor& out) {
  Backend& be = backend_;
  if (shard_.size == 1 || be.compensator_shape(l).first == 0) {
    be.linear(in, l, out);
    if (shard_.size > 1) {
      Tensor* ts[] = {&out};
      be.all_reduce_sum(ts);
    }
    return;
  }
  Tensor z = be.alloc_f32(in.rows, be.compensator_shape(l).first);
  be.linear_ec_partial(in, l, out, z);
  Tensor* ts[] = {&out, &z};
  be.all_reduce_sum(ts);
  be.ec_expand(z, l, out);
}

void Model::run_layer(int li, Tensor& x, const Batch& batch, KvCache& cache, const TapFn* taps) {
  require_single_rank("layer-by-layer calibration");
  BatchDesc d = describe(batch);
  backend_.begin_batch(d, cache);
  run_layer_desc(li, x, d, cache, taps);
}

void Model::run_layer_desc(int li, Tensor& x, const BatchDesc& d, KvCache& cache, const TapFn* taps,
                           Tensor* residual, Tensor* normed) {
  Backend& be = backend_;
  const ModelConfig& c = cfg_;
  const int64_t T = x.rows;
  const std::vector<int32_t>& pos = d.positions;
  auto run_linear = [&](const Linear& l, const Tensor& in, Tensor& out) {
    if (taps) (*taps)(l.name, TapPoint::Input, in);
    be.linear(in, l, out);
    if (taps) (*taps)(l.name, TapPoint::Output, out);
  };
  Tensor h = be.alloc(T, c.hidden_size), tmp = be.alloc(T, c.hidden_size);
  const Shard& sh = shard_;
  if (taps) require_single_rank("observing activations (calibration, diagnostics)");
  const int q_dim = sh.heads * c.head_dim, kv_dim = sh.kv_heads * c.head_dim;
  Tensor q = be.alloc(T, q_dim), att = be.alloc(T, q_dim);
  Tensor k = be.alloc(T, kv_dim), v = be.alloc(T, kv_dim);
  Tensor gate = be.alloc(T, sh.intermediate), up = be.alloc(T, sh.intermediate);

  DecoderLayer& L = layers_[size_t(li)];
  const float eps = float(c.rms_norm_eps);
  if (normed && normed->data) {
    h = *normed;
    *normed = Tensor();
  } else if (residual && residual->data) {
    be.add_rms_norm(x, *residual, L.attn_norm, eps, h);
    *residual = Tensor();
  } else {
    be.rms_norm(x, L.attn_norm, eps, h);
  }
  // Without taps, modules that share an input run as one group (one launch on the GPU).
  auto run_group = [&](std::initializer_list<const Linear*> ls, std::initializer_list<Tensor*> outs) {
    if (taps) {
      auto o = outs.begin();
      for (const Linear* l : ls) run_linear(*l, h, **o++);
    } else {
      be.linear_group(h, std::span<const Linear* const>(ls.begin(), ls.size()),
                      std::span<Tensor* const>(outs.begin(), outs.size()));
    }
  };
  run_group({L.q.get(), L.k.get(), L.v.get()}, {&q, &k, &v});
  AttentionParams ap;
  ap.layer = li;
  ap.n_heads = sh.heads;
  ap.n_kv_heads = sh.kv_heads;
  ap.head_dim = c.head_dim;
  ap.window = c.sliding_window[size_t(li)];
  ap.scale = 1.f / std::sqrt(float(c.head_dim));
  if (!be.rope_attention(q, k, v, pos, rope_, d.seqs, cache, ap, att)) {
    ap.kv_appended = be.rope_qk(q, k, v, sh.heads, sh.kv_heads, c.head_dim, pos, rope_, cache, li);
    be.attention(q, k, v, d.seqs, cache, ap, att);
  }
  // Decode-step fusions (Backend::linear_fused; one device, no taps): the residual add and the next element-wise
  // step inside the W4 launches. Each falls back to the ops it replaces.
  const bool fuse = sh.size == 1 && !taps;
  auto fused = [&](const Tensor& in, std::initializer_list<const Linear*> ls, std::initializer_list<Tensor*> outs,
                   const Backend::LinearFusion& f) {
    return fuse && be.linear_fused(in, std::span<const Linear* const>(ls.begin(), ls.size()),
                                   std::span<Tensor* const>(outs.begin(), outs.size()), f);
  };
  // x += o(att); h = rms_norm(x)·mlp_norm in the backend's own way where it has one: the fused tail under tensor
  // parallelism, on one device a compensated o whose EC term the norm launch adds.
  const bool o_tail = !taps && (sh.size > 1 ? be.row_parallel_tail(att, *L.o, x, L.mlp_norm, eps, h)
                                            : be.linear_residual_norm(att, *L.o, x, L.mlp_norm, eps, h));
  if (!o_tail) {
    Backend::LinearFusion o_fusion;  // x += o(att); h = rms_norm(x)·mlp_norm
    o_fusion.residual = true;
    o_fusion.norm_w = &L.mlp_norm;
    o_fusion.eps = eps;
    o_fusion.norm_out = &h;
    if (!fused(att, {L.o.get()}, {&x}, o_fusion)) {
      if (sh.size > 1)
        row_parallel_linear(*L.o, att, tmp);
      else
        run_linear(*L.o, att, tmp);
      // One device: the whole MLP block where the backend fuses it (x is then final; no pending residual).
      if (sh.size == 1 && !taps && be.fused_mlp(x, tmp, L.mlp_norm, eps, *L.gate, *L.up, *L.down)) return;
      be.add_rms_norm(x, tmp, L.mlp_norm, eps, h);
    }
  }
  Backend::LinearFusion gate_up_fusion;  // gate = silu(gate) ⊙ up
  gate_up_fusion.swiglu_out = &gate;
  if (!fused(h, {L.gate.get(), L.up.get()}, {&gate, &up}, gate_up_fusion) &&
      !(sh.size == 1 && !taps && be.linear_swiglu(h, *L.gate, *L.up, gate, up))) {
    run_group({L.gate.get(), L.up.get()}, {&gate, &up});
    be.swiglu(gate, up, gate);
  }
  if (fuse) {  // x += down(gate), and the next layer's input norm (the final norm after the last layer) for the caller
    Backend::LinearFusion down_fusion;  // into h: gate/up have read it, and down does not
    down_fusion.residual = true;
    if (normed) {
      down_fusion.norm_w = li + 1 < c.num_layers ? &layers_[size_t(li + 1)].attn_norm : &final_norm_;
      down_fusion.eps = eps;
      down_fusion.norm_out = &h;
    }
    if (fused(gate, {L.down.get()}, {&x}, down_fusion)) {
      if (normed) *normed = h;
      return;
    }
  }
  if (normed && !taps) {  // x += down(gate) and the next norm, as for o above
    const Tensor& next_norm = li + 1 < c.num_layers ? layers_[size_t(li + 1)].attn_norm : final_norm_;
    Tensor next_h = sh.size > 1 ? be.alloc(T, c.hidden_size) : h;  // one device: h is free (gate/up have read it)
    if (sh.size > 1 ? be.row_parallel_tail(gate, *L.down, x, next_norm, eps, next_h)
                    : be.linear_residual_norm(gate, *L.down, x, next_norm, eps, next_h)) {
      *normed = next_h;
      return;
    }
  }
  Tensor mlp_out = be.alloc(T, c.hidden_size);
  if (sh.size > 1)
    row_parallel_linear(*L.down, gate, mlp_out);
  else
    run_linear(*L.down, gate, mlp_out);
  if (residual && !taps)
    *residual = mlp_out;
  else
    be.add(x, mlp_out);
  if (taps) (*taps)("model.layers." + std::to_string(li), TapPoint::Output, x);
}

std::vector<float> Model::logits(const Tensor& x, const Batch& batch, LogitsMode mode, const TapFn* taps) {
  require_single_rank("layer-by-layer calibration");
  BatchDesc d = describe(batch);
  Tensor xv = x;  // a view (logits_desc takes the residual stream by reference for its fused add)
  Tensor out = logits_desc(xv, d, mode, taps);
  if (mode == LogitsMode::None) return {};
  std::vector<float> host(static_cast<size_t>(out.numel()));
  backend_.download(out, host.data());
  return host;
}

Tensor Model::logits_desc(Tensor& x, const BatchDesc& d, LogitsMode mode, const TapFn* taps, Tensor* residual,
                          Tensor* normed) {
  Backend& be = backend_;
  Tensor h = be.alloc(x.rows, cfg_.hidden_size);
  if (normed && normed->data) {
    h = *normed;
    *normed = Tensor();
  } else if (residual && residual->data) {
    be.add_rms_norm(x, *residual, final_norm_, float(cfg_.rms_norm_eps), h);
    *residual = Tensor();
  } else {
    be.rms_norm(x, final_norm_, float(cfg_.rms_norm_eps), h);
  }
  if (taps) (*taps)("model.norm", TapPoint::Output, h);
  if (mode == LogitsMode::None) return {};
  Tensor sel = h;
  if (mode == LogitsMode::LastPerSeq) {
    sel = be.alloc(int64_t(d.last_rows.size()), cfg_.hidden_size);
    be.gather_rows(h, d.last_rows, sel);
  }
  Tensor out = be.alloc_f32(sel.rows, cfg_.vocab_size);
  if (shard_.vocab_split) {
    Tensor part = be.alloc_f32(sel.rows, cfg_.vocab_size / shard_.size);
    be.linear(sel, *lm_head_, part);
    be.all_gather_cols(part, out);
  } else {
    be.linear(sel, *lm_head_, out);
  }
  return out;
}

std::vector<float> Model::forward_local(const Batch& batch, KvCache& cache, LogitsMode mode, const TapFn* taps) {
  if (batch.tokens.empty()) return {};
  check_batch(batch, cache);
  const BatchDesc d = describe(batch);
  backend_.begin_batch(d, cache);
  Tensor x = embed_tokens(d.tokens);
  Tensor residual;
  Tensor residual_normed;
  for (int li = 0; li < cfg_.num_layers; ++li) run_layer_desc(li, x, d, cache, taps, &residual, &residual_normed);
  Tensor out = logits_desc(x, d, mode, taps, &residual, &residual_normed);
  if (mode == LogitsMode::None) return {};
  std::vector<float> host(static_cast<size_t>(out.numel()));
  backend_.download(out, host.data());
  return host;
}

std::vector<int32_t> Model::forward_greedy_local(const Batch& batch, KvCache& cache) {
  if (batch.tokens.empty()) return {};
  check_batch(batch, cache);
  const BatchDesc d = describe(batch);
  backend_.begin_batch(d, cache);
  auto body = [&] {
    Tensor x = embed_tokens(d.tokens);
    Tensor residual;
    Tensor normed;
    for (int li = 0; li < cfg_.num_layers; ++li) run_layer_desc(li, x, d, cache, nullptr, &residual, &normed);
    Tensor logits = logits_desc(x, d, LogitsMode::LastPerSeq, nullptr, &residual, &normed);
    Tensor ids = backend_.alloc_ids(logits.rows);
    backend_.argmax_rows(logits, ids);
    return ids;
  };
  // Decode steps of the same batch size (and KV cache) replay one graph with new batch contents; prefill and mixed
  // iterations one per (tokens, sequences), which fixes every launch of theirs (attention's grid included: the
  // lengths are read on the device).
  const uint64_t key = d.decode_only() ? uint64_t(d.seqs.size()) : prefill_graph_key(d.tokens.size(), d.seqs.size());
  const Tensor ids = d.seqs.size() < (size_t(1) << 24) ? backend_.run_graph(key, body) : body();
  std::vector<int32_t> out(static_cast<size_t>(ids.rows));
  backend_.download_i32(ids, out.data());
  return out;
}

}  // namespace spear
