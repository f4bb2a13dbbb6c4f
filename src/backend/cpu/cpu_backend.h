#pragma once
// CPU backend: fp32 activations and weights, GEMMs through OpenBLAS, element-wise loops with OpenMP.
#include "backend/backend.h"
#include "backend/cpu/int4_linear.h"
#include "spear/compensator.h"

namespace spear {

// What every CPU linear carries besides its weights: an optional error compensator.
class CpuLinearBase : public Linear {
 public:
  std::unique_ptr<Compensator> ec;
  size_t ec_bytes() const { return ec ? ec->param_count() * sizeof(float) : 0; }
};

class CpuDenseLinear : public CpuLinearBase {
 public:
  std::vector<float> w;     // [out, in]
  std::vector<float> bias;  // [out] or empty
  size_t weight_bytes() const override { return (w.size() + bias.size()) * sizeof(float) + ec_bytes(); }
};

// Weights quantized to 2..8 bits, computed from packed codes (int4_linear.h).
class CpuQuantLinear : public CpuLinearBase {
 public:
  CpuQuantWeights w;
  std::vector<float> bias;
  size_t weight_bytes() const override { return quant_weight_bytes(w) + bias.size() * sizeof(float) + ec_bytes(); }
};

// Contiguous per-slot cache: k[layer][slot][pos][kv_dim] (v the same).
class CpuKvCache : public KvCache {
 public:
  CpuKvCache(int n_layers, int n_slots, int max_tokens, int kv_dim);
  int num_slots() const override { return n_slots_; }
  int max_tokens() const override { return max_tokens_; }
  size_t bytes() const override { return (k_.size() + v_.size()) * sizeof(float); }
  int kv_dim() const { return kv_dim_; }
  float* k(int layer, int slot) { return k_.data() + offset(layer, slot); }
  float* v(int layer, int slot) { return v_.data() + offset(layer, slot); }

 private:
  size_t offset(int layer, int slot) const {
    return (size_t(layer) * n_slots_ + size_t(slot)) * size_t(max_tokens_) * size_t(kv_dim_);
  }
  int n_layers_, n_slots_, max_tokens_, kv_dim_;
  std::vector<float> k_, v_;
};

class CpuBackend : public Backend {
 public:
  CpuBackend();
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::CPU; }
  // Not under tensor parallelism: every rank must run the same forward passes in the same order.
  bool concurrent_forwards() const override { return tp_size() == 1; }

  Tensor alloc(int64_t rows, int64_t cols) override;
  Tensor upload(const float* host, int64_t rows, int64_t cols) override;
  void download(const Tensor& t, float* host) override;
  void download_i32(const Tensor& t, int32_t* host) override;
  std::unique_ptr<Linear> make_linear(const LinearWeights& w) override;
  std::unique_ptr<Linear> make_quant_linear(const std::string& name, const PackedQuantWeights& w,
                                            const std::vector<float>& bias) override;
  Tensor dense_weight_tensor(const Linear& l) override;
  void set_compensator(Linear& l, const Compensator* c) override;
  std::pair<int, int> compensator_shape(const Linear& l) const override {
    const auto* b = dynamic_cast<const CpuLinearBase*>(&l);
    return b && b->ec ? std::pair<int, int>{b->ec->rank, b->ec->gate_width} : std::pair<int, int>{0, 0};
  }
  std::unique_ptr<KvCache> make_kv_cache(int n_layers, int n_slots, int max_tokens, int kv_dim) override;

  void gather_rows(const Tensor& table, std::span<const int32_t> ids, Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override;
  void linear(const Tensor& x, const Linear& w, Tensor& out) override;
  void all_reduce_sum(std::span<Tensor* const> ts) override;
  void all_gather_cols(const Tensor& part, Tensor& full) override;
  void linear_ec_partial(const Tensor& x, const Linear& l, Tensor& out, Tensor& z) override;
  void ec_expand(const Tensor& z, const Linear& l, Tensor& out) override;
  void rope(Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
            const RopeTable& table) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, std::span<const SeqSlice> seqs,
                 KvCache& cache, const AttentionParams& p, Tensor& out) override;
  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void add(Tensor& x, const Tensor& y) override;
  void argmax_rows(const Tensor& x, Tensor& ids) override;
  Tensor alloc_ids(int64_t rows) override;
};

// Kernels as plain functions over raw pointers, so tests and benchmarks can call them directly.
// y[T, n] = x[T, k]·Wᵀ (+ bias), W [n, k] row-major.
void cpu_linear_f32(const float* x, int T, int k, const float* w, const float* bias, int n, float* y);
void cpu_rms_norm_f32(const float* x, const float* w, int T, int d, float eps, float* out);
void cpu_rope_f32(float* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq);

}  // namespace spear
