#include "io/hf_config.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear {

using nlohmann::json;

namespace {

template <typename T>
T req(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) fail("{}: missing required field '{}'", where, key);
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail("{}: field '{}' has the wrong type ({})", where, key, it->dump());
  }
}

template <typename T>
T opt(const json& j, const char* key, T dflt, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail("{}: field '{}' has the wrong type ({})", where, key, it->dump());
  }
}

std::vector<int> int_or_list(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (it->is_number_integer()) return {it->get<int>()};
  std::vector<int> v;
  if (it->is_array())
    for (const auto& e : *it)
      if (e.is_number_integer()) v.push_back(e.get<int>());
  return v;
}

void parse_rope(const json& j, const std::string& where, ModelConfig& c) {
  // transformers >= 5 writes {"rope_parameters": {"rope_theta", "rope_type", ...}}; older versions write
  // rope_theta at top level and an optional "rope_scaling" object.
  const json* params = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) params = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) params = &j["rope_scaling"];
  c.rope.theta = opt<double>(j, "rope_theta", 10000.0, where);
  if (!params) return;
  const json& p = *params;
  c.rope.theta = opt<double>(p, "rope_theta", c.rope.theta, where);
  std::string type = opt<std::string>(p, "rope_type", opt<std::string>(p, "type", "default", where), where);
  c.rope.type = type;
  if (type == "default") return;
  if (type == "linear") {
    c.rope.factor = req<double>(p, "factor", where + " rope scaling");
    return;
  }
  if (type == "llama3") {
    c.rope.factor = req<double>(p, "factor", where + " rope scaling");
    c.rope.low_freq_factor = req<double>(p, "low_freq_factor", where + " rope scaling");
    c.rope.high_freq_factor = req<double>(p, "high_freq_factor", where + " rope scaling");
    c.rope.original_max_position = req<int>(p, "original_max_position_embeddings", where + " rope scaling");
    if (c.rope.high_freq_factor <= c.rope.low_freq_factor)
      fail("{}: llama3 rope scaling needs high_freq_factor > low_freq_factor", where);
    return;
  }
  fail("{}: RoPE scaling type '{}' is not supported (supported: default, linear, llama3)", where, type);
}

}  // namespace

ModelConfig parse_model_config(const json& j, const std::string& where, const std::vector<ArchSpec>& archs) {
  if (!j.is_object()) fail("{}: config must be a JSON object", where);
  ModelConfig c;
  auto arch_list = j.find("architectures");
  if (arch_list == j.end() || !arch_list->is_array() || arch_list->empty() || !(*arch_list)[0].is_string())
    fail("{}: missing 'architectures' (expected e.g. [\"LlamaForCausalLM\"])", where);
  c.architecture = (*arch_list)[0].get<std::string>();
  const ArchSpec* spec = nullptr;
  std::string names;
  for (const auto& a : archs) {
    names += std::string(names.empty() ? "" : ", ") + a.architecture;
    if (c.architecture == a.architecture) spec = &a;
  }
  if (!spec) fail("{}: architecture '{}' is not supported (supported: {})", where, c.architecture, names);

  c.model_type = opt<std::string>(j, "model_type", "", where);
  c.vocab_size = req<int>(j, "vocab_size", where);
  c.hidden_size = req<int>(j, "hidden_size", where);
  c.intermediate_size = req<int>(j, "intermediate_size", where);
  c.num_layers = req<int>(j, "num_hidden_layers", where);
  c.num_heads = req<int>(j, "num_attention_heads", where);
  c.num_kv_heads = opt<int>(j, "num_key_value_heads", c.num_heads, where);
  c.head_dim = opt<int>(j, "head_dim", 0, where);
  if (c.head_dim == 0) {
    if (c.num_heads <= 0 || c.hidden_size % c.num_heads)
      fail("{}: hidden_size {} is not divisible by num_attention_heads {}", where, c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  c.max_position_embeddings = opt<int>(j, "max_position_embeddings", 2048, where);
  c.rms_norm_eps = opt<double>(j, "rms_norm_eps", 1e-6, where);
  c.tie_word_embeddings = opt<bool>(j, "tie_word_embeddings", false, where);
  std::string act = opt<std::string>(j, "hidden_act", "silu", where);
  if (act != "silu") fail("{}: hidden_act '{}' is not supported (only silu / SwiGLU)", where, act);

  std::string dt = opt<std::string>(j, "dtype", opt<std::string>(j, "torch_dtype", "bfloat16", where), where);
  if (dt == "bfloat16") c.dtype = DType::BF16;
  else if (dt == "float16") c.dtype = DType::F16;
  else if (dt == "float32") c.dtype = DType::F32;
  else fail("{}: dtype '{}' is not supported (bfloat16, float16, float32)", where, dt);

  parse_rope(j, where, c);
  c.sliding_window.assign(size_t(std::max(c.num_layers, 0)), 0);
  c.bos_token_ids = int_or_list(j, "bos_token_id");
  c.eos_token_ids = int_or_list(j, "eos_token_id");
  spec->parse(j, where, c);

  // Consistency: reject what the forward pass could not compute correctly.
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 ||
      c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0)
    fail("{}: sizes must be positive", where);
  if (c.num_heads % c.num_kv_heads)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", where, c.num_heads,
         c.num_kv_heads);
  if (c.head_dim % 2) fail("{}: head_dim {} must be even for RoPE", where, c.head_dim);
  if (c.rms_norm_eps <= 0) fail("{}: rms_norm_eps must be positive", where);
  return c;
}

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open", path);
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

ModelConfig load_model_config(const std::string& dir, const std::vector<ArchSpec>& archs) {
  std::string path = (std::filesystem::path(dir) / "config.json").string();
  if (!std::filesystem::exists(path)) fail("{}: no config.json (is it a Hugging Face model directory?)", dir);
  return parse_model_config(read_json_file(path), path, archs);
}

}  // namespace spear
