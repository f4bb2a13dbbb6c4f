#include "backend/cpu/cpu_backend.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace spear {

CpuKvCache::CpuKvCache(int n_layers, int n_slots, int max_tokens, int kv_dim)
    : n_layers_(n_layers), n_slots_(n_slots), max_tokens_(max_tokens), kv_dim_(kv_dim) {
  size_t n = size_t(n_layers) * n_slots * max_tokens * kv_dim;
  k_.assign(n, 0.f);
  v_.assign(n, 0.f);
}

CpuBackend::CpuBackend() = default;

Tensor CpuBackend::alloc(int64_t rows, int64_t cols) {
  Tensor t;
  size_t n = size_t(rows * cols);
  std::shared_ptr<float[]> buf(new float[n ? n : 1]);
  t.data = buf.get();
  t.storage = std::shared_ptr<void>(buf, buf.get());
  t.rows = rows;
  t.cols = cols;
  return t;
}

Tensor CpuBackend::upload(const float* host, int64_t rows, int64_t cols) {
  Tensor t = alloc(rows, cols);
  std::memcpy(t.data, host, t.nbytes());
  return t;
}

void CpuBackend::download(const Tensor& t, float* host) { std::memcpy(host, t.data, t.nbytes()); }

void CpuBackend::download_i32(const Tensor& t, int32_t* host) {
  SPEAR_CHECK(t.dtype == DType::I32, "download_i32: tensor is not I32");
  std::memcpy(host, t.data, t.nbytes());
}

Tensor CpuBackend::alloc_ids(int64_t rows) {
  Tensor t;
  std::shared_ptr<int32_t[]> buf(new int32_t[size_t(rows > 0 ? rows : 1)]);
  t.data = buf.get();
  t.storage = std::shared_ptr<void>(buf, buf.get());
  t.dtype = DType::I32;
  t.rows = rows;
  t.cols = 1;
  return t;
}

void CpuBackend::argmax_rows(const Tensor& x, Tensor& ids) {
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* row = x.ptr<float>() + r * x.cols;
    int64_t best = 0;
    for (int64_t c = 1; c < x.cols; ++c)
      if (row[c] > row[best]) best = c;
    ids.ptr<int32_t>()[r] = int32_t(best);
  }
}

std::unique_ptr<Linear> CpuBackend::make_linear(const LinearWeights& w) {
  auto l = std::make_unique<CpuDenseLinear>();
  l->name = w.name;
  l->in_features = w.in_features;
  l->out_features = w.out_features;
  l->w = w.w;
  l->bias = w.bias;
  return l;
}

std::unique_ptr<Linear> CpuBackend::make_quant_linear(const std::string& name, const PackedQuantWeights& w,
                                                      const std::vector<float>& bias) {
  auto l = std::make_unique<CpuQuantLinear>();
  l->name = name;
  l->in_features = w.in;
  l->out_features = w.out;
  l->w = prepare_cpu_quant(w);
  l->bias = bias;
  return l;
}

Tensor CpuBackend::dense_weight_tensor(const Linear& l) {
  auto* d = dynamic_cast<const CpuDenseLinear*>(&l);
  if (!d) fail("{}: not a dense layer", l.name);
  Tensor t;
  t.data = const_cast<float*>(d->w.data());
  t.rows = d->out_features;
  t.cols = d->in_features;
  return t;
}

std::unique_ptr<KvCache> CpuBackend::make_kv_cache(int n_layers, int n_slots, int max_tokens, int kv_dim) {
  return std::make_unique<CpuKvCache>(n_layers, n_slots, max_tokens, kv_dim);
}

void CpuBackend::gather_rows(const Tensor& table, std::span<const int32_t> ids, Tensor& out) {
  const int64_t d = table.cols;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) fail("row index {} outside [0, {}) (token id outside the vocabulary?)", ids[i], table.rows);
    std::memcpy(out.ptr<float>() + i * d, table.ptr<float>() + ids[i] * d, size_t(d) * sizeof(float));
  }
}

void cpu_rms_norm_f32(const float* x, const float* w, int T, int d, float eps, float* out) {
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + size_t(t) * d;
    float ss = 0.f;
    for (int i = 0; i < d; ++i) ss += xr[i] * xr[i];
    // HF: x * rsqrt(mean(x²) + eps) in fp32, then weight * (that).
    float inv = 1.f / std::sqrt(ss / float(d) + eps);
    float* o = out + size_t(t) * d;
    for (int i = 0; i < d; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) {
  cpu_rms_norm_f32(x.ptr<float>(), w.ptr<float>(), int(x.rows), int(x.cols), eps, out.ptr<float>());
}

namespace {
void linear_no_ec(const Tensor& x, const Linear& l, Tensor& out) {
  if (auto* q = dynamic_cast<const CpuQuantLinear*>(&l)) {
    quant_linear_f32(x.ptr<float>(), int(x.rows), q->w, q->bias.empty() ? nullptr : q->bias.data(), out.ptr<float>());
  } else {
    const auto& d = static_cast<const CpuDenseLinear&>(l);
    cpu_linear_f32(x.ptr<float>(), int(x.rows), d.in_features, d.w.data(), d.bias.empty() ? nullptr : d.bias.data(),
                   d.out_features, out.ptr<float>());
  }
}

const Compensator& attached_ec(const Linear& l) {
  const auto& base = static_cast<const CpuLinearBase&>(l);
  if (!base.ec) fail("{}: no error compensator attached", l.name);
  return *base.ec;
}
}  // namespace

void CpuBackend::linear(const Tensor& x, const Linear& l, Tensor& out) {
  linear_no_ec(x, l, out);
  const auto& base = static_cast<const CpuLinearBase&>(l);
  if (base.ec) compensator_apply(*base.ec, x.ptr<float>(), int(x.rows), out.ptr<float>());
}

void CpuBackend::linear_ec_partial(const Tensor& x, const Linear& l, Tensor& out, Tensor& z) {
  const Compensator& c = attached_ec(l);
  if (z.rows != x.rows || z.cols != c.rank) fail("{}: z is [{}, {}], expected [{}, {}]", l.name, z.rows, z.cols, x.rows, c.rank);
  linear_no_ec(x, l, out);
  compensator_project(c, x.ptr<float>(), int(x.rows), z.ptr<float>());
}

void CpuBackend::ec_expand(const Tensor& z, const Linear& l, Tensor& out) {
  compensator_expand(attached_ec(l), z.ptr<float>(), int(z.rows), out.ptr<float>());
}

void CpuBackend::all_gather_cols(const Tensor& part, Tensor& full) {
  const int R = tp_size();
  if (full.rows != part.rows || full.cols != part.cols * R)
    fail("all_gather_cols: [{}, {}] parts do not make [{}, {}] over {} ranks", part.rows, part.cols, full.rows,
         full.cols, R);
  if (R == 1) {
    std::memcpy(full.data, part.data, part.nbytes());
    return;
  }
  std::vector<float> all(size_t(R) * size_t(part.numel()));  // [rank][rows][cols]
  pg_->all_gather(part.data, part.nbytes(), all.data());
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < part.rows; ++i)
      std::memcpy(full.ptr<float>() + i * full.cols + r * part.cols,
                  all.data() + (size_t(r) * size_t(part.rows) + size_t(i)) * size_t(part.cols),
                  size_t(part.cols) * sizeof(float));
}

void CpuBackend::all_reduce_sum(std::span<Tensor* const> ts) {
  if (tp_size() == 1) return;
  for (Tensor* t : ts) pg_->all_reduce_sum(t->ptr<float>(), size_t(t->numel()));
}

void CpuBackend::set_compensator(Linear& l, const Compensator* c) {
  auto* base = dynamic_cast<CpuLinearBase*>(&l);
  if (!base) fail("{}: not a CPU linear layer", l.name);
  if (!c) {
    base->ec.reset();
    return;
  }
  c->validate();
  if (c->in != l.in_features || c->out != l.out_features)
    fail("{}: compensator is [{} -> {}], the layer [{} -> {}]", l.name, c->in, c->out, l.in_features, l.out_features);
  base->ec = std::make_unique<Compensator>(*c);
}

void cpu_rope_f32(float* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq) {
  const int half = head_dim / 2;
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    float cs[512], sn[512];  // head_dim <= 1024
    for (int i = 0; i < half; ++i) {
      // HF computes the angle as an fp32 product, then cos/sin of it.
      float ang = float(positions[t]) * inv_freq[i];
      cs[i] = std::cos(ang);
      sn[i] = std::sin(ang);
    }
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (size_t(t) * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void CpuBackend::rope(Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
                      const RopeTable& table) {
  if (head_dim > 1024) fail("head_dim {} > 1024 is not supported by the CPU RoPE kernel", head_dim);
  cpu_rope_f32(x.ptr<float>(), int(x.rows), n_heads, head_dim, positions.data(), table.inv_freq.data());
}

void CpuBackend::swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  const float* g = gate.ptr<float>();
  const float* u = up.ptr<float>();
  float* o = out.ptr<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd if (n > 65536)
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

void CpuBackend::add(Tensor& x, const Tensor& y) {
  float* a = x.ptr<float>();
  const float* b = y.ptr<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd if (n > 65536)
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

}  // namespace spear
