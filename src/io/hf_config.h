#pragma once
// The subset of Hugging Face config.json that decoder-only Llama-family models need, normalised across
// architectures and transformers versions (e.g. rope_theta at top level vs rope_parameters).
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/dtype.h"

namespace spear {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;               // linear, llama3
  double low_freq_factor = 1.0;      // llama3
  double high_freq_factor = 4.0;     // llama3
  int original_max_position = 8192;  // llama3
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  std::string model_type;    // e.g. "llama"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // Qwen2: always; Llama: attention_bias
  bool o_bias = false;    // Llama attention_bias also covers o_proj
  bool mlp_bias = false;
  std::vector<int> sliding_window;  // per layer; 0 = full causal attention
  DType dtype = DType::BF16;        // stored dtype (torch_dtype / dtype)
  std::vector<int> bos_token_ids;
  std::vector<int> eos_token_ids;

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
};

// Architecture-specific parts of config parsing. The registry lives in the model layer (one small file
// per architecture, model/arch_*.cpp); io only parses what all of them share.
struct ArchSpec {
  const char* architecture;  // HF "architectures"[0]
  void (*parse)(const nlohmann::json& j, const std::string& where, ModelConfig& c);
};

// Throws spear::Error naming the field for anything missing, inconsistent or unsupported (architecture,
// activation, RoPE scaling type, ...). `where` names the file in messages.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& where, const std::vector<ArchSpec>& archs);
ModelConfig load_model_config(const std::string& dir, const std::vector<ArchSpec>& archs);

// Helpers for the per-architecture parsers.
nlohmann::json read_json_file(const std::string& path);

}  // namespace spear
