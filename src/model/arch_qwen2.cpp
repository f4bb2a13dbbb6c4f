// Qwen2: biases on q, k, v (never o); optional sliding-window attention on the layers listed as
// "sliding_attention" in layer_types, or on layers >= max_window_layers when use_sliding_window is set.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/model.h"

namespace spear {

void parse_qwen2_config(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  c.qkv_bias = true;
  c.o_bias = false;
  const bool use_sw = j.value("use_sliding_window", false);
  const int window = j.contains("sliding_window") && j["sliding_window"].is_number_integer()
                         ? j["sliding_window"].get<int>() : 0;
  if (!use_sw) return;
  if (window <= 0) fail("{}: use_sliding_window is set but sliding_window is missing or not positive", where);
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    const auto& lt = j["layer_types"];
    if (int(lt.size()) != c.num_layers)
      fail("{}: layer_types has {} entries for {} layers", where, lt.size(), c.num_layers);
    for (int i = 0; i < c.num_layers; ++i) {
      std::string t = lt[size_t(i)].is_string() ? lt[size_t(i)].get<std::string>() : "";
      if (t == "sliding_attention") c.sliding_window[size_t(i)] = window;
      else if (t != "full_attention") fail("{}: layer_types[{}] '{}' is not supported", where, i, t);
    }
    return;
  }
  const int max_window_layers = j.value("max_window_layers", c.num_layers);
  for (int i = max_window_layers; i < c.num_layers; ++i) c.sliding_window[size_t(i)] = window;
}

}  // namespace spear
