#pragma once
// Stage 1 of compensator training: closed-form A, B for every placed module, in layer order, like
// sequential GPTQ. Statistics come from the quantized model's own inputs at each module, with every earlier
// compensator already applied, so later compensators see (and the regression target absorbs) the error
// that reaches them; the full-precision model runs alongside for the regression target.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/cpu/int4_linear.h"
#include "spear/closed_form.h"
#include "spear/compensator.h"
#include "spear/placement.h"

namespace spear {

class Model;

struct ClosedFormOptions {
  EcInit init = EcInit::Regression;
  float gate_init_std = 1.f;  // see CalibrateOptions
  uint64_t seed = 0;
  int chunk_sequences = 8;
};

// `fp` is the full-precision model and `qm` the quantized one (same architecture, same backend); the new
// compensators are attached to `qm` as they are made. Returns them in forward order; `report` receives
// per-module figures (activation-weighted error before/after, seconds).
std::vector<Compensator> fit_closed_form(Model& fp, Model& qm, const std::string& model_dir,
                                         const std::map<std::string, PackedQuantWeights>& quantized,
                                         const Placement& placement, const std::vector<std::vector<int32_t>>& seqs,
                                         const ClosedFormOptions& o, nlohmann::json& report);

}  // namespace spear
