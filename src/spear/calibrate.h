#pragma once
// `spear calibrate`: the whole SPEAR pipeline from a Hugging Face checkpoint to a package with error
// compensators. Phases (each with a progress bar and a timing in the report):
//   1. calibration data (model samples or --calib text) and quantization (RTN or GPTQ);
//   2. diagnostic (spear/diagnose.h) on a subset of the calibration sequences;
//   3. placement under the budget (spear/placement.h);
//   4. stage 1: closed-form A, B module by module in layer order, on the quantized model with the earlier
//      compensators already applied (spear/closed_form.h);
//   5. stage 2: end-to-end KL distillation of all compensators jointly (spear/train/);
//   6. the package (bf16 compensators) and a JSON report.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "quant/quantize_model.h"
#include "spear/placement.h"
#include "spear/train/trainer.h"

namespace spear {

struct CalibrateOptions {
  QuantizeOptions quant;          // method, bits, group, calibration source/size/seed
  PlacementOptions placement;     // rule, budget, gate width (0 with compensator = static)
  std::string compensator = "gated";  // gated | static
  std::string init = "regression";    // regression | qera | lqer | svd
  float gate_init_std = 1.f;          // W1 ~ N(0, (gate_init_std / sqrt(rank · E[z²]))²): silu inputs of order 1
  int diag_samples = 16, diag_len = 256;  // diagnostic subset (first sequences, truncated)
  int stage1_samples = 32;                // sequences for the closed-form statistics
  int chunk_sequences = 8;                // sequences per forward pass in stage 1
  TrainOptions train;                     // steps = 0: closed form only
  std::string diagnosis_in;               // reuse a diagnosis (JSON from a previous report) instead of computing it
  std::string calib_ids_in;               // read the calibration sequences (save_calibration JSON) instead of making them
  std::string calib_ids_out;              // save the calibration sequences used
};

struct CalibrateResult {
  nlohmann::json report;  // everything: options, timings, diagnosis, placement, stage-1 errors, training curve
  PackageManifest manifest;
};

CalibrateResult calibrate(const std::string& model_dir, const std::string& out_dir, const CalibrateOptions& o);

// Peak resident memory of this process (VmHWM), bytes; 0 when unknown.
size_t peak_rss_bytes();

}  // namespace spear
