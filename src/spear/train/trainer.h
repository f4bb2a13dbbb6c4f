#pragma once
// Stage 2 of DESIGN.md §2: end-to-end distillation of the error compensators. Adam(W) on every EC parameter
// (A, B and, unless frozen, the gate W1, b1, W2, b2) against the mean KL divergence between the FP model's
// next-token distribution (from its final hidden states) and the compensated quantized model's.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "spear/compensator.h"
#include "spear/train/train_weights.h"

namespace spear {

struct TrainOptions {
  int steps = 200;
  int batch_seqs = 4;  // sequences per step
  float lr = 1e-3f, lr_gate = -1.f;  // lr_gate -1: same as lr
  float weight_decay = 0.f;          // decoupled (AdamW), on A, B, W1, W2 (not on biases)
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  int warmup = 10;                   // linear warm-up steps
  std::string schedule = "cosine";   // cosine (to 0 at the last step) | constant
  float grad_clip = 1.0f;            // global L2 norm over every trained parameter; 0 = off
  uint64_t seed = 0;                 // order of sequences (seeded shuffle per epoch)
  bool train_gate = true;            // false: W1, b1, W2, b2 frozen
  // initial_loss / final_loss: true = mean loss over all sequences before / after training (two forward
  // passes over the data); false = the first and the last step's batch loss.
  bool full_eval = true;
  std::function<void(int step, double loss)> on_step;  // progress reporting (may be empty)
};

struct TrainReport {
  std::vector<double> loss_per_step;  // the batch loss at each step, before its update
  double seconds = 0;                 // the training loop (not the evaluations)
  double tokens_per_second = 0;       // tokens of the training steps / seconds
  double initial_loss = 0, final_loss = 0;
};

// Trains the ecs in place on `seqs` (all the same length) with the teacher's final-normed hidden states
// teacher_hidden [n_seqs * len, hidden]. Parameters stay fp32 (round_to_bf16 is the caller's, when packaging).
TrainReport train_compensators(const TrainWeights& w, std::vector<Compensator*> ecs,
                               const std::vector<std::vector<int32_t>>& seqs, const std::vector<float>& teacher_hidden,
                               const TrainOptions& o);

// The learning rate of `step` (0-based) under o's warm-up and schedule, for a base rate `lr`.
float scheduled_lr(const TrainOptions& o, float lr, int step);

}  // namespace spear
