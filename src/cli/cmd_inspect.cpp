// spear inspect: what a model directory holds, without loading the weights.
#include <cstdio>
#include <map>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/package.h"

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
    auto ends_with = [](const std::string& s, const std::string& suf) {
      return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
    };
    long quant_bytes = 0, quant_params = 0;
    for (const auto& n : ck.names()) {
      const TensorView& t = ck.get(n);
      if (ends_with(n, ".qweight") || ends_with(n, ".scales") || ends_with(n, ".zeros")) {
        // Packed codes: count the weights they stand for, not the bytes.
        quant_bytes += long(t.nbytes);
        if (ends_with(n, ".qweight")) {
          const int in = n.find("o_proj") != std::string::npos ? c.q_dim()
                         : n.find("down_proj") != std::string::npos ? c.intermediate_size : c.hidden_size;
          quant_params += long(t.shape[0]) * in;
          params += long(t.shape[0]) * in;
        }
        continue;
      }
      auto& e = by_dtype[std::string(dtype_name(t.dtype))];
      e.first += 1;
      e.second += t.numel();
      params += t.numel();
    }
    std::optional<PackageManifest> pkg;
    if (is_package(o->model_dir)) pkg = read_manifest(o->model_dir);
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
      if (pkg) {
        j["package"] = manifest_to_json(*pkg);
        j["quantized_parameters"] = quant_params;
        j["quantized_bytes"] = quant_bytes;
      }
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
    for (const auto& [k, v] : by_dtype) std::printf("  %-6s %4ld tensors  %ld elements\n", k.c_str(), v.first, v.second);
    if (pkg) {
      const auto& q = *pkg;
      std::printf("package       format v%d, %s, %d-bit %s, %s, %zu quantized modules\n", q.format_version,
                  q.method.c_str(), q.params.bits, q.params.symmetric ? "symmetric" : "asymmetric",
                  q.params.group_size < 0 ? "per channel" : fmt::format("group {}", q.params.group_size).c_str(),
                  q.quantized_modules.size());
      std::printf("quantized     %ld weights in %.2f MB (%.2f bits per weight incl. scales and zeros)\n", quant_params,
                  quant_bytes / 1e6, 8.0 * double(quant_bytes) / double(quant_params));
      std::printf("calibration   %s%s%s, %d x %d tokens, seed %llu, data hash %s\n", q.calibration_source.c_str(),
                  q.calibration_file.empty() ? "" : " ", q.calibration_file.c_str(), q.calibration_samples,
                  q.calibration_len, (unsigned long long)q.seed, q.data_hash.empty() ? "-" : q.data_hash.c_str());
    }
  });
}

}  // namespace spear::cli
