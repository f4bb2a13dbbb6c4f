// Llama (1/2/3/3.1/3.2): no biases unless attention_bias / mlp_bias; llama3 RoPE scaling handled in rope.cpp.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/model.h"

namespace spear {

void parse_llama_config(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  auto flag = [&](const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return false;
    if (!it->is_boolean()) fail("{}: '{}' must be true or false", where, key);
    return it->get<bool>();
  };
  c.qkv_bias = c.o_bias = flag("attention_bias");  // HF LlamaAttention applies it to q, k, v and o
  c.mlp_bias = flag("mlp_bias");
  if (j.contains("pretraining_tp") && j["pretraining_tp"].is_number_integer() && j["pretraining_tp"].get<int>() != 1) {
    // pretraining_tp only changes how HF slices the matmuls, not the function; accepted.
  }
}

}  // namespace spear
