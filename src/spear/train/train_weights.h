#pragma once
// The model's weights in fp32 for EC training (DESIGN.md §2, stage 2). Quantized linears hold their
// dequantized weights ((q - zero) * scale, exactly as unpack_quantized + QuantizedMatrix::dequantize), every
// other tensor the checkpoint's values upcast to fp32. Everything here is frozen during training.
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/int4_linear.h"
#include "io/hf_config.h"

namespace spear {

struct TrainLinear {
  std::string name;  // checkpoint module name, e.g. "model.layers.3.mlp.down_proj"
  int out = 0, in = 0;
  std::vector<float> w;     // [out, in]
  std::vector<float> bias;  // [out] or empty
};

struct TrainLayer {
  std::vector<float> attn_norm, mlp_norm;  // [hidden]
  TrainLinear q, k, v, o, gate, up, down;
  // The seven linears in a fixed order (the module slots of the train decoder): q k v o gate up down.
  static constexpr int kNumLinears = 7;
  const TrainLinear& linear(int slot) const;
  TrainLinear& linear(int slot);
};

struct TrainWeights {
  ModelConfig cfg;
  RopeTable rope;
  std::vector<float> embed;       // [vocab, hidden]
  std::vector<float> lm_head;     // [vocab, hidden]; empty when tied (then embed is used)
  std::vector<float> final_norm;  // [hidden]
  std::vector<TrainLayer> layers;

  const float* head() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
  TrainLinear* find(const std::string& module);  // nullptr if absent
  const TrainLinear* find(const std::string& module) const;
  // Layer and slot (0..6, TrainLayer::linear order) of a module; false if absent.
  bool locate(const std::string& module, int& layer, int& slot) const;
};

// Reads a Hugging Face checkpoint directory (or a SPEAR package: its packed linears are dequantized). Every
// module in `quantized` (module name -> packed weights) takes the dequantized weights instead of the
// checkpoint's; a name that is not a linear of the model, or a shape mismatch, throws naming the module.
TrainWeights load_train_weights(const std::string& model_dir,
                                const std::map<std::string, PackedQuantWeights>& quantized = {});

}  // namespace spear
