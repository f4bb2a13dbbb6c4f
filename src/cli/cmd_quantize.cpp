// spear quantize: a Hugging Face checkpoint to a quantized package (RTN or GPTQ).
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "quant/quantize_model.h"

namespace spear::cli {

void register_quantize(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto q = std::make_shared<QuantizeOptions>();
  auto out = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "quantize", "Quantize every decoder linear layer (q, k, v, o, gate, up, down) and write a package; "
                  "embeddings and lm_head stay 16-bit");
  add_model_option(cmd, *o);
  cmd->add_option("--out,-o", *out, "Output package directory")->required();
  cmd->add_option("--method", q->method, "rtn: round to nearest; gptq: Hessian-aware (needs calibration)")
      ->check(CLI::IsMember({"rtn", "gptq"}));
  cmd->add_option("--bits", q->params.bits, "Bits per weight (4 is the primary path; 2-4 stored in 4-bit "
                                            "containers, 5-8 in bytes)")
      ->check(CLI::Range(2, 8));
  cmd->add_option("--group", q->params.group_size, "Group size along the input dimension; -1 = per output "
                                                   "channel (default)");
  cmd->add_flag("--sym", q->params.symmetric, "Symmetric grid (zero point fixed mid-range)");
  cmd->add_option("--calib", q->calib_file, "GPTQ calibration text file (default: sample from the model)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--calib-samples", q->calib_samples, "GPTQ calibration sequences")->check(CLI::Range(1, 100000));
  cmd->add_option("--calib-len", q->calib_len, "Tokens per calibration sequence")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--seed", q->seed, "Seed for calibration sampling");
  cmd->add_option("--damp", q->gptq.damp, "GPTQ damping, fraction of mean diag(H)")->check(CLI::Range(0.0, 10.0));
  cmd->add_flag("!--no-act-order", q->gptq.act_order, "GPTQ: process columns in the original order");
  add_runtime_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    if (q->params.group_size == 0 || q->params.group_size < -1)
      throw CLI::ValidationError("--group", "must be -1 or a positive group size");
    auto backend = make_backend(*o);  // applies --threads
    QuantizeResult r = quantize_model(o->model_dir, *out, *q);
    const double ratio = double(r.package_bytes) / double(r.source_bytes);
    if (o->json) {
      nlohmann::json j = manifest_to_json(r.manifest);
      j["package"] = *out;
      j["seconds"] = r.seconds;
      j["calibration_seconds"] = r.calibration_seconds;
      j["package_bytes"] = r.package_bytes;
      j["source_bytes"] = r.source_bytes;
      j["quantized_parameters"] = r.quantized_params;
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("quantized %zu linear layers (%zu parameters) with %s, %d bits, %s%s in %.1f s\n",
                  r.manifest.quantized_modules.size(), r.quantized_params, r.manifest.method.c_str(),
                  r.manifest.params.bits,
                  r.manifest.params.group_size < 0 ? "per channel" : ("group " + std::to_string(r.manifest.params.group_size)).c_str(),
                  r.manifest.params.symmetric ? ", symmetric" : "", r.seconds);
      std::printf("package %s: %.2f MB (source tensors %.2f MB, %.1f%%)\n", out->c_str(), r.package_bytes / 1e6,
                  r.source_bytes / 1e6, 100 * ratio);
    }
  });
}

}  // namespace spear::cli
