// Mistral: Llama without biases, with sliding-window attention on every layer when sliding_window is set.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/model.h"

namespace spear {

void parse_mistral_config(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  c.qkv_bias = c.o_bias = c.mlp_bias = false;
  auto it = j.find("sliding_window");
  if (it == j.end() || it->is_null()) return;
  if (!it->is_number_integer() || it->get<int>() <= 0)
    fail("{}: sliding_window must be a positive integer or null", where);
  for (auto& w : c.sliding_window) w = it->get<int>();
}

}  // namespace spear
