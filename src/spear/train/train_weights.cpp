#include "spear/train/train_weights.h"

#include <optional>
#include <utility>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/package.h"

namespace spear {

const TrainLinear& TrainLayer::linear(int slot) const {
  switch (slot) {
    case 0: return q;
    case 1: return k;
    case 2: return v;
    case 3: return o;
    case 4: return gate;
    case 5: return up;
    case 6: return down;
  }
  fail("TrainLayer::linear: slot {} outside 0..6", slot);
}

TrainLinear& TrainLayer::linear(int slot) { return const_cast<TrainLinear&>(std::as_const(*this).linear(slot)); }

bool TrainWeights::locate(const std::string& module, int& layer, int& slot) const {
  for (int l = 0; l < int(layers.size()); ++l)
    for (int s = 0; s < TrainLayer::kNumLinears; ++s)
      if (layers[size_t(l)].linear(s).name == module) {
        layer = l, slot = s;
        return true;
      }
  return false;
}

const TrainLinear* TrainWeights::find(const std::string& module) const {
  int l = 0, s = 0;
  return locate(module, l, s) ? &layers[size_t(l)].linear(s) : nullptr;
}

TrainLinear* TrainWeights::find(const std::string& module) {
  return const_cast<TrainLinear*>(std::as_const(*this).find(module));
}

namespace {

std::vector<float> read_f32(const Checkpoint& ck, const std::string& name, std::vector<int64_t> shape) {
  const TensorView& t = ck.get(name);
  if (t.shape != shape) {
    TensorView w;
    w.shape = shape;
    fail("{}: tensor '{}' has shape {}, the config implies {}", t.file, t.name, t.shape_str(), w.shape_str());
  }
  return t.to_f32();
}

}  // namespace

TrainWeights load_train_weights(const std::string& dir, const std::map<std::string, PackedQuantWeights>& quantized) {
  TrainWeights w;
  w.cfg = load_config(dir);
  const ModelConfig& c = w.cfg;
  Checkpoint ck(dir);
  const bool package = is_package(dir);
  std::optional<PackageManifest> manifest;
  if (package) manifest = read_manifest(dir);
  const int H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;

  w.embed = read_f32(ck, "model.embed_tokens.weight", {V, H});
  w.final_norm = read_f32(ck, "model.norm.weight", {H});
  if (!c.tie_word_embeddings) {
    if (!ck.has("lm_head.weight"))
      fail("{}: tie_word_embeddings is false but the checkpoint has no 'lm_head.weight'", dir);
    w.lm_head = read_f32(ck, "lm_head.weight", {V, H});
  }

  size_t used = 0;
  w.layers.resize(size_t(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    TrainLayer& L = w.layers[size_t(i)];
    L.attn_norm = read_f32(ck, p + "input_layernorm.weight", {H});
    L.mlp_norm = read_f32(ck, p + "post_attention_layernorm.weight", {H});
    auto lin = [&](TrainLinear& t, const std::string& n, int out, int in, bool bias) {
      t.name = p + n;
      t.out = out;
      t.in = in;
      auto qi = quantized.find(t.name);
      if (qi != quantized.end()) {
        const PackedQuantWeights& q = qi->second;
        if (q.out != out || q.in != in)
          fail("load_train_weights: quantized '{}' is [{}, {}], the model needs [{}, {}]", t.name, q.out, q.in, out, in);
        t.w = unpack_quantized(q).dequantize();
        ++used;
      } else if (package && ck.has(t.name + ".qweight")) {
        t.w = unpack_quantized(read_quantized_linear(ck, *manifest, t.name, out, in)).dequantize();
      } else {
        t.w = read_f32(ck, t.name + ".weight", {out, in});
      }
      if (bias) t.bias = read_f32(ck, t.name + ".bias", {out});
    };
    lin(L.q, "self_attn.q_proj", c.q_dim(), H, c.qkv_bias);
    lin(L.k, "self_attn.k_proj", c.kv_dim(), H, c.qkv_bias);
    lin(L.v, "self_attn.v_proj", c.kv_dim(), H, c.qkv_bias);
    lin(L.o, "self_attn.o_proj", H, c.q_dim(), c.o_bias);
    lin(L.gate, "mlp.gate_proj", I, H, c.mlp_bias);
    lin(L.up, "mlp.up_proj", I, H, c.mlp_bias);
    lin(L.down, "mlp.down_proj", H, I, c.mlp_bias);
  }
  if (used != quantized.size())
    for (const auto& [name, q] : quantized)
      if (!w.find(name)) fail("load_train_weights: quantized module '{}' is not a linear of {}", name, dir);
  w.rope = make_rope_table(c.rope, c.head_dim, c.dtype);
  return w;
}

}  // namespace spear
