#pragma once
// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers"), following the reference gptq.py / AutoGPTQ's fasterquant, on the same integer grid as RTN
// (find_grid / quantize_value in quantizer.h): with a diagonal Hessian and no act-order it reduces to RTN
// exactly (same integers).
//
// Choices (see gptq.cpp for the details):
//  * Precision: H, H^-1 and its Cholesky factor in fp64; the weight being updated (W and the error terms)
//    also in fp64 (the reference keeps W in fp32). A value is rounded to fp32 only where it meets the grid
//    (find_grid / quantize_value take fp32, as the reference's fp32 W does). Deterministic: rows are
//    processed in fixed chunks with sequential (single-threaded) Eigen kernels inside an OpenMP loop, so the
//    result is byte-identical for any thread count.
//  * Groups without act-order: a group's grid is found, when its first column is reached, from the current
//    (error-updated by every earlier column) weights of that group -- GPTQ's default. The reference takes them
//    from W, which is missing the lazy updates of the current block (so its result depends on block_size);
//    here they include them, so the result is independent of block_size and equals the unblocked algorithm.
//  * Groups with act-order: "static groups" (AutoGPTQ static_groups=True): every group's grid is computed up
//    front from the unmodified W (dead columns zeroed) over the ORIGINAL contiguous columns
//    [g*len, (g+1)*len), then GPTQ runs in act-order with those fixed grids. So group of column c = c / len
//    holds for the output, as QuantizedMatrix requires (no g_idx).
//  * Per-channel (group_size = -1): one grid per row from the full original row, up front (the reference's
//    quantizer.find_params(W) before the dead-column fix).
#include <cstddef>  // quantizer.h uses size_t without including it
#include <vector>

#include "quant/quantizer.h"

namespace spear {

struct GptqOptions {
  double damp = 0.01;   // H += damp * mean(diag(H)) * I
  bool act_order = true;  // process columns by descending diag(H)
  int block_size = 128;   // lazy-batch block (the result does not depend on it, up to fp64 rounding)
};

// W [out, in] fp32 row-major; H [in, in] fp64 = 2/N sum x x^T over the calibration inputs of this layer (any
// positive scale: the algorithm is invariant to it). Returns the quantized matrix in the ORIGINAL column order.
// Throws spear::Error on bad parameters or a Hessian that is not positive definite after damping.
QuantizedMatrix gptq_quantize(const float* w, int out, int in, const double* H, const QuantParams& p,
                              const GptqOptions& opt = {});

// Running Hessian of a layer's inputs: on return H [in, in] (row-major, symmetric) = 2/N sum x x^T over all
// N tokens seen so far (N = n_seen), updated like gptq.py's add_batch (H *= n/(n+t); H += 2/(n+t) X^T X),
// with X^T X accumulated in fp64. x is [n_tokens, in] fp32 row-major. An empty H (or n_seen == 0) starts over.
// Unlike gptq.py, N counts tokens, not sequences; the scale of H does not change gptq_quantize's result.
void accumulate_hessian(const float* x, int n_tokens, int in, std::vector<double>& H, long& n_seen);

}  // namespace spear
