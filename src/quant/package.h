#pragma once
// Quantized model packages: a directory with config.json, the tokenizer files, model.safetensors (packed
// weights `<module>.qweight` / `.scales` / `.zeros` for quantized linears, every other tensor as in the
// source checkpoint) and manifest.json. Format: docs/package-format.md.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/cpu/int4_linear.h"
#include "quant/quantizer.h"
#include "spear/compensator.h"

namespace spear {

// Version 2 added error compensators (compensators.safetensors); version 1 packages (none) still load.
inline constexpr int kPackageFormatVersion = 2;

struct CompensatorInfo {
  std::string module;
  int rank = 0, gate_width = 0;
};

struct PackageManifest {
  int format_version = kPackageFormatVersion;
  std::string method;  // "rtn" | "gptq"
  QuantParams params;
  int container_bits = 4;
  std::string calibration_source = "none";  // "none" | "file" | "model-samples"
  std::string calibration_file;             // base name, when from a file
  int calibration_samples = 0, calibration_len = 0;
  uint64_t seed = 0;
  std::string data_hash;  // FNV-1a 64 of the calibration token ids, hex; "" when none
  std::string tool_version;
  std::string source_model;  // base name of the source checkpoint directory
  std::vector<std::string> quantized_modules;
  std::vector<CompensatorInfo> compensators;  // stored in compensators.safetensors
  size_t compensator_bytes = 0;
  nlohmann::json extra = nlohmann::json::object();  // later stages (error compensators) add sections here
};

bool is_package(const std::string& dir);
PackageManifest read_manifest(const std::string& dir);  // validates; throws naming the field
nlohmann::json manifest_to_json(const PackageManifest& m);

// Writes the package; `quantized` maps module names ("model.layers.0.self_attn.q_proj") to packed weights.
// Deterministic: the same inputs give byte-identical files (tensors sorted by name, no timestamps).
// `ecs` (error compensators) go to compensators.safetensors in bf16, listed in the manifest.
void write_package(const std::string& out_dir, const std::string& source_dir, const PackageManifest& manifest,
                   const std::map<std::string, PackedQuantWeights>& quantized, const std::vector<Compensator>& ecs = {});

// Reads and validates the package's compensators (shapes from the manifest against the given module dims).
std::vector<Compensator> read_compensators(const std::string& dir, const PackageManifest& m,
                                           const std::map<std::string, std::pair<int, int>>& module_dims);

// Reads and validates one quantized linear of a package (shapes against the manifest and the expected
// [out, in]; codes and zero points within range).
class Checkpoint;
PackedQuantWeights read_quantized_linear(const Checkpoint& ck, const PackageManifest& m, const std::string& module,
                                         int out, int in);

uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 1469598103934665603ull);

}  // namespace spear
