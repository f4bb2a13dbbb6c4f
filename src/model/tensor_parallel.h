#pragma once
// How tensor parallelism splits a decoder (DESIGN.md §5, the Megatron split): q/k/v/gate/up are column-parallel (a rank
// holds a contiguous slice of the output features: whole attention heads and a slice of the MLP width, so attention and
// SwiGLU run locally), o/down row-parallel (a slice of the input features; the partial outputs are summed over the
// ranks). Embeddings and norms are replicated; the lm_head is split over the vocabulary when it divides.
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/int4_linear.h"
#include "spear/compensator.h"

namespace spear {

enum class ShardKind {
  Replicated,
  OutRows,  // column-parallel: rows [r·out/size, (r+1)·out/size) of W, of its bias and of an EC's B
  InCols,   // row-parallel: columns [r·in/size, ...) of W and of an EC's A; the bias and B stay whole
};

// The kind of a decoder linear by its checkpoint name ("model.layers.3.mlp.down_proj" -> InCols).
ShardKind shard_kind_of(const std::string& module);

// Rank `rank` of `size`'s part of each weight. The split dimension must divide by size (and, for quantized input
// columns, into whole quantization groups); otherwise spear::Error names the module and the sizes.
LinearWeights shard_linear(const LinearWeights& w, ShardKind kind, int rank, int size);
PackedQuantWeights shard_quant(const std::string& module, const PackedQuantWeights& w, ShardKind kind, int rank,
                               int size);
// A row-parallel bias is added once, by rank 0, since the partial outputs are summed.
std::vector<float> shard_bias(const std::vector<float>& b, ShardKind kind, int rank, int size);
// Column-parallel: B's rows (A and the gate whole: each rank computes the full z = A·x from its full input);
// row-parallel: A's columns (z is then a partial sum that the ranks add before the gate).
Compensator shard_compensator(const Compensator& c, ShardKind kind, int rank, int size);

}  // namespace spear
