// spear inspect: what a model directory holds, without loading the weights.
#include <cstdio>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace spear::cli {

void register_inspect(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  CLI::App* cmd = app.add_subcommand("inspect", "Architecture, sizes, dtypes and parameter count of a model");
  add_model_option(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    ModelConfig c = load_config(o->model_dir);
    Checkpoint ck(o->model_dir);
    std::map<std::string, std::pair<long, long>> by_dtype;  // dtype -> (tensors, params)
    long params = 0;
    for (const auto& n : ck.names()) {
      const TensorView& t = ck.get(n);
      auto& e = by_dtype[std::string(dtype_name(t.dtype))];
      e.first += 1;
      e.second += t.numel();
      params += t.numel();
    }
    std::string windows;
    for (size_t i = 0; i < c.sliding_window.size(); ++i)
      if (c.sliding_window[i]) windows += fmt::format("{}{}:{}", windows.empty() ? "" : ",", i, c.sliding_window[i]);
    if (o->json) {
      nlohmann::json dt = nlohmann::json::object();
      for (const auto& [k, v] : by_dtype) dt[k] = {{"tensors", v.first}, {"parameters", v.second}};
      nlohmann::json j = {{"model", o->model_dir},
                          {"architecture", c.architecture},
                          {"vocab_size", c.vocab_size},
                          {"hidden_size", c.hidden_size},
                          {"intermediate_size", c.intermediate_size},
                          {"num_layers", c.num_layers},
                          {"num_heads", c.num_heads},
                          {"num_kv_heads", c.num_kv_heads},
                          {"head_dim", c.head_dim},
                          {"max_position_embeddings", c.max_position_embeddings},
                          {"rms_norm_eps", c.rms_norm_eps},
                          {"rope", {{"type", c.rope.type}, {"theta", c.rope.theta}, {"factor", c.rope.factor}}},
                          {"tie_word_embeddings", c.tie_word_embeddings},
                          {"qkv_bias", c.qkv_bias},
                          {"sliding_window", c.sliding_window},
                          {"dtype", std::string(dtype_name(c.dtype))},
                          {"parameters", params},
                          {"tensors", ck.names().size()},
                          {"files", ck.num_files()},
                          {"bytes", ck.total_bytes()},
                          {"dtypes", dt}};
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("model         %s\n", o->model_dir.c_str());
    std::printf("architecture  %s\n", c.architecture.c_str());
    std::printf("layers        %d\n", c.num_layers);
    std::printf("hidden        %d   (MLP %d, SwiGLU)\n", c.hidden_size, c.intermediate_size);
    std::printf("attention     %d heads x %d, %d KV heads (GQA %d:1)%s%s\n", c.num_heads, c.head_dim,
                c.num_kv_heads, c.num_heads / c.num_kv_heads, c.qkv_bias ? ", qkv bias" : "",
                windows.empty() ? "" : (", sliding window " + windows).c_str());
    std::printf("rope          %s, theta %g%s\n", c.rope.type.c_str(), c.rope.theta,
                c.rope.type == "default" ? "" : fmt::format(", factor {}", c.rope.factor).c_str());
    std::printf("vocab         %d%s\n", c.vocab_size, c.tie_word_embeddings ? " (tied embeddings)" : "");
    std::printf("context       %d\n", c.max_position_embeddings);
    std::printf("parameters    %ld (%.1fM)\n", params, double(params) / 1e6);
    std::printf("checkpoint    %zu tensors in %zu file(s), %.1f MB\n", ck.names().size(), ck.num_files(),
                double(ck.total_bytes()) / 1e6);
    for (const auto& [k, v] : by_dtype) std::printf("  %-6s %4ld tensors  %ld parameters\n", k.c_str(), v.first, v.second);
  });
}

}  // namespace spear::cli
