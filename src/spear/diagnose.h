#pragma once
// The CKA-guided, entropy-aware diagnostic (DESIGN.md §3): how much quantizing each linear module alone
// changes the model's final hidden states (1 − linear CKA), its hidden-state MSE and its next-token
// distribution (KL); how concentrated that damage is (entropy of the normalised damage, exp(H) = effective
// number of damaged modules); and what a compensator costs on each module (bytes, measured latency).
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/cpu/int4_linear.h"

namespace spear {

class Model;

struct ModuleDamage {
  std::string module;  // "model.layers.3.mlp.down_proj"
  int layer = 0;
  std::string kind;    // "q_proj", "k_proj", ..., "down_proj"
  int out = 0, in = 0;
  double cka = 1, damage = 0;  // damage = 1 − CKA of the final hidden states
  double rel_mse = 0;          // ‖h_m − h‖² / ‖h‖² over all calibration tokens
  double kl = 0;               // mean KL(p_fp ‖ p_m) of the next-token distributions
  size_t bytes_per_rank = 0;   // EC bytes per unit of rank (bf16, without gate)
  double linear_us = 0;        // measured: the quantized linear alone, one token
  double ec_us_per_rank = 0;   // measured: the compensator's extra time per unit of rank, one token
};

struct Diagnosis {
  std::vector<ModuleDamage> modules;  // forward order
  double entropy = 0;                 // H of p_m = d_m / Σ d (nats)
  double effective_modules = 0;       // exp(H)
  long tokens = 0;
  double seconds = 0;
  nlohmann::json to_json() const;
};

struct DiagnoseOptions {
  bool measure_latency = true;
  int latency_rank = 16;  // rank of the compensator timed per module shape
};

// `model` is the full-precision model; `quantized` gives each module's quantized weights (a module missing
// from it is skipped). `seqs` are the calibration sequences used (all the same length).
Diagnosis diagnose(Model& model, const std::string& model_dir, const std::map<std::string, PackedQuantWeights>& quantized,
                   const std::vector<std::vector<int32_t>>& seqs, const DiagnoseOptions& o = {});

// Layer × module table for the terminal.
std::string format_diagnosis(const Diagnosis& d);

// Heat map (layers × module kinds) of the damage; `chosen` (module -> rank) outlines the placement.
void plot_diagnosis(const std::string& png_path, const Diagnosis& d, const std::map<std::string, int>& chosen = {});

}  // namespace spear
