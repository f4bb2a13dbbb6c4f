#pragma once
// Random-weight checkpoints with the exact shapes of real models (`spear make-model --like NAME --random`),
// so speed and memory can be measured at real sizes without downloading weights. The output is an ordinary
// Hugging Face directory (config.json, generation_config.json, model.safetensors or shards with
// model.safetensors.index.json) that Model::load reads like any other. No tokenizer is written (`spear
// make-model --tokenizer DIR` copies one and sets decodable_vocab): such a model is for benchmarks that feed
// token ids; `spear ppl` / `generate` / `tokenize` / `serve` need tokenizer.json.
//
// Weights, as transformers initialises Llama (initializer_range 0.02): every linear, the embedding and an
// untied lm_head ~ N(0, 0.02²); RMSNorm weights 1.0; stored as bf16 (round to nearest even).
//
// The generator is counter-based, so the bytes depend on the seed only, not on the thread count or the
// sharding: tensor `name` gets key = splitmix64(splitmix64(seed) + fnv1a64(name)); counter k of that stream
// (elements 2k and 2k+1) takes h = splitmix64(key + (k + 1)·γ) and maps it through Box–Muller in fp32:
//   u1 = (h[63:40] + 1) / 2^24 ∈ (0, 1],  v = h[23:0],  θ = 2π·v / 2^24
//   r = sqrt(-2 ln u1),  z0 = r cos θ,  z1 = r sin θ,  stored as bf16(std · z)
// i.e. an exact standard normal up to the 24-bit quantisation of the uniforms (|z| <= 5.77, a bound reached
// with probability 2^-24 per pair). ln, sqrt, sin and cos are polynomial / Newton approximations accurate to
// ~1e-7 (far below bf16's 2^-9), written as plain fp32 arithmetic: no libm, and the loop vectorises
// (~1.6 ns per element on one AVX-512 core). Bytes are identical across machines and libcs for builds
// with the same FMA contraction (every -march with FMA, which includes all x86-64-v3 and newer); a build
// without FMA may differ in a rare last bf16 bit.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/hf_config.h"

namespace spear {

// The shapes of real models, by name: tiny (tests), llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-2-13b.
struct ModelPreset {
  std::string name;
  std::string description;  // one line for --help
  ModelConfig config;
};
const std::vector<ModelPreset>& model_presets();
// Throws spear::Error listing the preset names for an unknown one.
const ModelPreset& find_model_preset(std::string_view name);

// config.json for a Llama-architecture config, with the field names transformers writes (rope_theta and a
// "rope_scaling" object of rope_type llama3 / linear, or null). `provenance` (if not null) is stored as
// "spear_random" so nobody mistakes the directory for a trained model.
nlohmann::json llama_config_json(const ModelConfig& c, const nlohmann::json& provenance = nullptr);

// Parameters of the checkpoint the config describes (embedding, untied lm_head, linears with biases, norms),
// without reading any weights.
size_t parameter_count(const ModelConfig& c);

struct RandomModelOptions {
  uint64_t seed = 0;
  float init_std = 0.02f;  // transformers' initializer_range for Llama
  // Files larger than this are split into model-0000i-of-0000n.safetensors with an index, as
  // save_pretrained does (5 GB); one tensor larger than the limit gets a shard of its own.
  size_t max_shard_bytes = 5'000'000'000;
  std::string like;  // preset name, recorded in config.json and the safetensors metadata
  bool progress = true;
  // > 0: rows >= this of the output projection (lm_head, or the embedding when tied) are zero, so greedy
  // outputs stay among the first `decodable_vocab` ids (those of a tokenizer copied beside the weights: a
  // server on the random model then streams text for every token). The weights' size is unchanged.
  int decodable_vocab = 0;
};

struct RandomModelResult {
  size_t parameters = 0;
  size_t bytes = 0;  // tensor data written (bf16)
  int files = 0;     // safetensors files
  double seconds = 0;
};

// Writes the checkpoint into `out_dir`, which must not exist or be an empty directory (throws otherwise,
// and when the file system lacks the space). Memory: one shard's tensors at a time, plus the previous
// shard while it is being written (generation of shard i+1 overlaps the write of shard i).
RandomModelResult write_random_model(const ModelConfig& c, const std::string& out_dir, const RandomModelOptions& o);

// The generator, exposed for tests: fills dst[0..n) with bf16 of std·N(0, 1) from stream `key` (element i
// is a function of key and i only; an odd last element takes the first value of its pair). OpenMP-parallel.
uint64_t random_tensor_key(uint64_t seed, std::string_view tensor_name);
void fill_normal_bf16(uint16_t* dst, size_t n, uint64_t key, float std);

}  // namespace spear
