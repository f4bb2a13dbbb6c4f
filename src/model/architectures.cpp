// The registry of supported architectures; each lives in its own arch_*.cpp.
#include "model/model.h"

namespace spear {

void parse_llama_config(const nlohmann::json& j, const std::string& where, ModelConfig& c);
void parse_qwen2_config(const nlohmann::json& j, const std::string& where, ModelConfig& c);
void parse_mistral_config(const nlohmann::json& j, const std::string& where, ModelConfig& c);

const std::vector<ArchSpec>& supported_architectures() {
  static const std::vector<ArchSpec> archs = {
      {"LlamaForCausalLM", parse_llama_config},
      {"Qwen2ForCausalLM", parse_qwen2_config},
      {"MistralForCausalLM", parse_mistral_config},
  };
  return archs;
}

}  // namespace spear
