#pragma once
// Random-weight error compensators at a chosen density: what the EC benchmarks attach to random models of
// real sizes (`spear bench decode --ec-density`, `spear tune --ec-density`), where no calibration exists.
// Their cost depends only on shapes; the values are small so that outputs stay those of a sane model.
#include <cstdint>
#include <string>
#include <vector>

#include "spear/compensator.h"

namespace spear {

class Model;

// Compensators of rank `rank` (gate width `gate_width`, 0 = static) on round(density × #linears) decoder
// linears drawn uniformly without replacement (seeded), attached to the model's backend. Returns them (the
// CPU backend copies them; keep them anyway for reports). density 0 attaches none; density 1 all.
// kinds: when not empty, only the linears whose name ends in one of these (e.g. "o_proj", "down_proj") are drawn
// from, and density is a fraction of them; a kind that matches no linear is an error.
std::vector<Compensator> attach_random_compensators(Model& model, double density, int rank, int gate_width,
                                                    uint64_t seed, const std::vector<std::string>& kinds = {});
// Detaches every decoder linear's compensator.
void detach_compensators(Model& model);

}  // namespace spear
