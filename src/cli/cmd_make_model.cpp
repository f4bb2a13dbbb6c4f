// spear make-model: a random-weight checkpoint with the exact shapes of a real model, for measuring speed
// and memory at real sizes without downloading weights (model/random_model.h).
#include <cstdio>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>
#include <omp.h>

#include "cli/common.h"
#include "core/error.h"
#include "model/random_model.h"
#include "quant/quantize_model.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

namespace {

struct MakeModelOptions {
  std::string like, out, quantize_out, tokenizer;
  bool random = false;
  uint64_t seed = 0;
  int layers = 0;  // 0: the preset's
  int threads = 0;
  QuantParams quant{4, 128, false};
};

std::string preset_help() {
  std::string s = "Shapes to copy (config.json with the real model's fields and values):";
  for (const auto& p : model_presets()) s += "\n  " + p.name + ": " + p.description;
  return s;
}

void check_new_dir(const std::string& flag, const std::string& dir) {
  namespace fs = std::filesystem;
  if (fs::exists(dir) && (!fs::is_directory(dir) || !fs::is_empty(dir)))
    fail("{} {}: {}; refusing to overwrite it (choose a new directory or remove it)", flag, dir,
         fs::is_directory(dir) ? "directory is not empty" : "exists and is not a directory");
}

}  // namespace

void register_make_model(CLI::App& app) {
  auto o = std::make_shared<MakeModelOptions>();
  auto json_out = std::make_shared<CommonOptions>();
  CLI::App* cmd = app.add_subcommand(
      "make-model", "Write a checkpoint with random weights and the exact shapes of a real model, for speed and "
                    "memory benchmarks (weights N(0, 0.02^2), norms 1, bf16; deterministic per --seed). No "
                    "tokenizer is written unless --tokenizer lends one: use token ids (ppl / generate / tokenize / "
                    "serve need tokenizer.json)");
  std::vector<std::string> names;
  for (const auto& p : model_presets()) names.push_back(p.name);
  cmd->add_option("--like", o->like, preset_help())->required()->check(CLI::IsMember(names));
  cmd->add_flag("--random", o->random, "Random weights (required: the only source for now)")->required();
  cmd->add_option("--out,-o", o->out, "Output directory (must not exist or be empty)")->required();
  cmd->add_option("--seed", o->seed, "Seed; the bytes depend on it only, not on threads or sharding")
      ->capture_default_str();
  cmd->add_option("--layers", o->layers, "Override the number of decoder layers (quick runs)")
      ->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--quantize-out", o->quantize_out,
                  "Also write an RTN-quantized package of the random model into this directory");
  cmd->add_option("--bits", o->quant.bits, "--quantize-out: bits per weight")
      ->check(CLI::Range(2, 8))
      ->capture_default_str();
  cmd->add_option("--group", o->quant.group_size, "--quantize-out: group size along the input dimension; "
                                                  "-1 = per output channel")
      ->default_val(128);
  cmd->add_flag("--sym", o->quant.symmetric, "--quantize-out: symmetric grid");
  cmd->add_option("--tokenizer", o->tokenizer,
                  "Copy this directory's tokenizer (tokenizer.json, tokenizer_config.json) beside the weights and "
                  "zero the output rows beyond its vocabulary, so that greedy outputs decode to text (e.g. "
                  "models/ref-llama-23m, for `spear serve` benchmarks on a random model)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--threads,-t", o->threads, "CPU threads for generation (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  add_json_option(cmd, *json_out);
  cmd->callback([=] {
    if (!o->random) throw CLI::ValidationError("--random", "is required (the only source of weights for now)");
    if (o->quant.group_size == 0 || o->quant.group_size < -1)
      throw CLI::ValidationError("--group", "must be -1 or a positive group size");
    if (o->threads > 0) omp_set_num_threads(o->threads);
    const ModelPreset& preset = find_model_preset(o->like);
    ModelConfig cfg = preset.config;
    if (o->layers > 0) {
      cfg.num_layers = o->layers;
      cfg.sliding_window.assign(size_t(o->layers), 0);
    }
    // Fail before writing gigabytes.
    check_new_dir("--out", o->out);
    if (!o->quantize_out.empty()) {
      check_new_dir("--quantize-out", o->quantize_out);
      if (std::filesystem::absolute(o->quantize_out).lexically_normal() ==
          std::filesystem::absolute(o->out).lexically_normal())
        fail("--quantize-out must differ from --out");
    }

    RandomModelOptions ro;
    ro.seed = o->seed;
    ro.like = o->like;
    if (!o->tokenizer.empty()) {
      const int v = Tokenizer::from_dir(o->tokenizer).vocab_size();
      if (v > cfg.vocab_size)
        fail("--tokenizer {}: its vocabulary ({} ids) is larger than the model's ({})", o->tokenizer, v,
             cfg.vocab_size);
      ro.decodable_vocab = v;
    }
    RandomModelResult r = write_random_model(cfg, o->out, ro);
    if (!o->tokenizer.empty())
      for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
        const auto src = std::filesystem::path(o->tokenizer) / f;
        if (std::filesystem::exists(src)) std::filesystem::copy_file(src, std::filesystem::path(o->out) / f);
      }

    std::optional<QuantizeResult> q;
    if (!o->quantize_out.empty()) {
      QuantizeOptions qo;
      qo.method = "rtn";
      qo.params = o->quant;
      q = quantize_model(o->out, o->quantize_out, qo);
    }

    if (json_out->json) {
      nlohmann::json j = {{"like", o->like},          {"source", "random"},     {"out", o->out},
                          {"seed", o->seed},          {"layers", cfg.num_layers}, {"parameters", r.parameters},
                          {"bytes", r.bytes},         {"files", r.files},       {"seconds", r.seconds}};
      if (q) {
        j["quantized"] = {{"package", o->quantize_out},
                          {"method", "rtn"},
                          {"bits", q->manifest.params.bits},
                          {"group", q->manifest.params.group_size},
                          {"symmetric", q->manifest.params.symmetric},
                          {"package_bytes", q->package_bytes},
                          {"quantized_parameters", q->quantized_params},
                          {"seconds", q->seconds}};
      }
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("wrote %s (random, seed %llu, %d layers): %.3fB parameters, %.2f GB bf16 in %d file%s, %.1f s -> %s\n",
                  o->like.c_str(), static_cast<unsigned long long>(o->seed), cfg.num_layers, r.parameters / 1e9,
                  r.bytes / 1e9, r.files, r.files == 1 ? "" : "s", r.seconds, o->out.c_str());
      if (q) {
        const auto& p = q->manifest.params;
        std::printf("quantized (rtn, %d bits, %s%s): %zu parameters, package %.2f GB, %.1f s -> %s\n", p.bits,
                    p.group_size < 0 ? "per channel" : ("group " + std::to_string(p.group_size)).c_str(),
                    p.symmetric ? ", symmetric" : "", q->quantized_params, q->package_bytes / 1e9, q->seconds,
                    o->quantize_out.c_str());
      }
    }
  });
}

}  // namespace spear::cli
