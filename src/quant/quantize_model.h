#pragma once
// `spear quantize`: a Hugging Face checkpoint in, a quantized package out. RTN needs only the weights; GPTQ
// runs calibration sequences layer by layer through the model whose earlier layers are already quantized,
// collecting each linear's input Hessian H = 2/N Σ x xᵀ from the activation taps.
#include <cstdint>
#include <map>
#include <string>

#include "quant/gptq.h"
#include "quant/package.h"
#include "quant/quantizer.h"

namespace spear {

class Model;

struct QuantizeOptions {
  std::string method = "rtn";  // rtn | gptq
  QuantParams params;
  GptqOptions gptq;
  std::string calib_file;  // empty: sample calibration sequences from the model
  int calib_samples = 64;
  int calib_len = 512;
  uint64_t seed = 0;
  int chunk_sequences = 16;  // calibration sequences per forward pass (bounds memory)
};

struct QuantizeResult {
  PackageManifest manifest;
  double seconds = 0;
  double calibration_seconds = 0;
  size_t package_bytes = 0;   // model.safetensors
  size_t source_bytes = 0;    // the source checkpoint's tensors
  size_t quantized_params = 0;
};

QuantizeResult quantize_model(const std::string& model_dir, const std::string& out_dir, const QuantizeOptions& o);

// The same, in memory: the manifest (without compensators) and each module's packed weights. `calib`, when
// given, is used for GPTQ instead of building a calibration set from the options (calibration shares it).
struct QuantizedWeights {
  PackageManifest manifest;
  std::map<std::string, PackedQuantWeights> modules;
  size_t quantized_params = 0;
  double calibration_seconds = 0;
};
struct CalibrationSet;
QuantizedWeights quantize_weights(const std::string& model_dir, const QuantizeOptions& o,
                                  const CalibrationSet* calib = nullptr);

// The calibration set the options ask for: windows of o.calib_file, or samples from `model` (BOS from the
// tokenizer, else from config.json).
CalibrationSet make_calibration_set(Model& model, const std::string& model_dir, const std::string& calib_file,
                                    int samples, int len, uint64_t seed);

}  // namespace spear
