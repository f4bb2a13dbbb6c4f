#pragma once
// The decoder forward and backward for end-to-end EC training (DESIGN.md §2, stage 2), on the CPU in fp32.
// The forward is the inference forward (model/decoder.cpp) in the same math; the backward produces input
// gradients through every frozen op and parameter gradients only for the attached error compensators.
//
// A call processes a batch of whole sequences (each starting at position 0) as one token matrix: the linears
// are GEMMs over all tokens (Eigen, threaded), attention runs per (sequence, head). Activations of the layers
// the backward needs are kept ([tokens, ~13·hidden] floats per layer); attention probabilities are recomputed
// from the saved log-sum-exp, so memory is O(tokens), not O(tokens²). The backward stops at the lowest layer
// that holds an EC (and inside it, at the lowest op that needs a gradient); the embedding gets none.
#include <array>
#include <cstdint>
#include <vector>

#include "spear/compensator.h"
#include "spear/train/train_ops.h"
#include "spear/train/train_weights.h"

namespace spear {

struct EcGrads {  // same layout as the Compensator's arrays
  std::vector<float> A, B, W1, b1, W2, b2;
  void zero();
  double sq_norm() const;  // Σ of squares of every entry (fp64)
};

class TrainDecoder {
 public:
  // ecs: the compensators being trained, attached by Compensator::module (must name a linear of w, with the
  // linear's shape). They are read at every call, so the caller may update them between calls.
  TrainDecoder(const TrainWeights& w, std::vector<Compensator*> ecs);

  // Logits [Σ lengths, vocab] of every position of each sequence with the ECs applied.
  std::vector<float> forward_logits(const std::vector<std::vector<int32_t>>& seqs);
  // Forward + backward; teacher_hidden [Σ lengths, hidden] (the FP model's final-normed hidden states).
  // Returns the mean over all positions of KL(p_teacher || q_student); ADDS into grads (one per EC, sized on
  // first use).
  double loss_and_grad(const std::vector<std::vector<int32_t>>& seqs, const float* teacher_hidden,
                       std::vector<EcGrads>& grads);
  double loss(const std::vector<std::vector<int32_t>>& seqs, const float* teacher_hidden);  // forward only

  // The lowest layer holding an EC (num_layers when there is none): where the backward stops.
  int lowest_ec_layer() const { return lowest_; }
  // Final-normed hidden states [Σ lengths, hidden] of the last call (a copy).
  std::vector<float> final_hidden() const { return {hf_.begin(), hf_.end()}; }

 private:
  struct LayerActs {
    train::FloatBuf x, h, q, k, v, att, lse, xm, h2, gate, up, act, inv1, inv2;
  };
  const TrainWeights& w_;
  std::vector<Compensator*> ecs_;
  std::vector<std::array<int, TrainLayer::kNumLinears>> ec_at_;  // [layer][slot] -> index into ecs_, or -1
  int lowest_ = 0;

  // Batch state of the current call.
  int T_ = 0;
  std::vector<int32_t> tokens_, pos_;
  std::vector<train::SeqRange> ranges_;
  train::RopeCache rope_;
  int rope_len_ = 0;
  std::vector<LayerActs> acts_;
  std::vector<train::EcSaved> ec_saved_;
  train::FloatBuf x_, tmp_, hf_, inv_f_;
  struct GradBufs {
    train::FloatBuf dhf, dx, dh, ds, dgate, dup, datt, dq, dk, dv;
  } grad_;

  void prepare(const std::vector<std::vector<int32_t>>& seqs);
  void forward(bool save);  // embed -> layers -> final norm (hf_)
  void layer_forward(int l, LayerActs& a);
  void linear_forward(int l, int slot, const float* in, float* out);
  void backward(const float* dhf, std::vector<EcGrads>& grads);
  void ec_backward(int l, int slot, const float* in, const float* dy, std::vector<EcGrads>& grads, float* dx);
};

}  // namespace spear
