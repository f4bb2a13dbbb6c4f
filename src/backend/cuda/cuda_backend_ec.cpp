// The CUDA backend's error-compensator paths (issue 6, DESIGN.md §5): naive (separate kernels after the GEMM),
// fused (A·x, gate and B inside the W4 decode launch, w4a16_gemm.h) and overlapped (the EC
// on a second stream beside the GEMM, one add after the join), the dispatch between them, and their timing
// for `spear tune`.
#include <algorithm>
#include <array>
#include <functional>
#include <cstdio>
#include <random>

#include <cuda_bf16.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/ec_after_gemm.h"
#include "backend/cuda/ec_naive.h"
#include "backend/cuda/ec_overlap.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/swiglu_ec.h"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

__nv_bfloat16* bf(const Tensor& t) { return static_cast<__nv_bfloat16*>(t.data); }

int token_bucket(int m) {  // verbose reports: one line per power-of-two bucket
  int b = 1;
  while (b < m) b *= 2;
  return b;
}

}  // namespace

// The naive path: cuBLAS SGEMMs in fp32 and element-wise kernels, one after another (the reference and baseline).
void CudaBackend::sgemm_nt(const float* x, int T, int k, const float* w, int n, float* y, cublasHandle_t handle) {
  const float alpha = 1.f, beta = 0.f;
  SPEAR_CUBLAS_CHECK(cublasSgemm(handle ? handle : cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, T, k, &alpha, w, k, x, k, &beta, y, n));
}

void CudaBackend::apply_ec_naive(const CudaEc& ec, const Tensor& x, Tensor& y) {
  Tensor z = alloc_f32(x.rows, ec.rank);
  ec_project(ec, x, z);
  ec_expand_naive(ec, z, y);
}

void CudaBackend::ec_project(const CudaEc& ec, const Tensor& x, Tensor& z) {
  const int T = int(x.rows);
  Tensor x32 = alloc_f32(T, ec.in);
  bf16_to_f32(bf(x), x32.ptr<float>(), x.numel(), stream_);
  sgemm_nt(x32.ptr<float>(), T, ec.in, ec.A.as<float>(), ec.rank, z.ptr<float>());
}

void CudaBackend::ec_expand_naive(const CudaEc& ec, const Tensor& z, Tensor& y) {
  const int T = int(z.rows), r = ec.rank;
  Tensor d = alloc_f32(T, ec.out);
  const float* zg = z.ptr<float>();
  Tensor h, u;
  if (ec.gate_width > 0) {
    h = alloc_f32(T, ec.gate_width);
    u = alloc_f32(T, r);
    sgemm_nt(z.ptr<float>(), T, r, ec.W1.as<float>(), ec.gate_width, h.ptr<float>());
    ec_bias_silu_f32(h.ptr<float>(), ec.b1.as<float>(), T, ec.gate_width, stream_);
    sgemm_nt(h.ptr<float>(), T, ec.gate_width, ec.W2.as<float>(), r, u.ptr<float>());
    ec_gate_f32(u.ptr<float>(), ec.b2.as<float>(), z.ptr<float>(), u.ptr<float>(), T, r, stream_);
    zg = u.ptr<float>();
  }
  sgemm_nt(zg, T, r, ec.B.as<float>(), ec.out, d.ptr<float>());
  ec_add_into_bf16(bf(y), d.ptr<float>(), T, ec.out, stream_);
}

void CudaBackend::set_ec_path(EcPath p) {
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  drop_graphs();  // recorded with the previous choice
  ec_path_ = p;
  ec_reported_.clear();
}

void CudaBackend::set_ec_dispatch(std::shared_ptr<const EcDispatchTable> t) {
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  drop_graphs();
  ec_table_ = std::move(t);
  ec_reported_.clear();
}

bool CudaBackend::w4_dequant_ready(int m) {
  if (w4_dequant_min_m_ <= 0 || m < w4_dequant_min_m_ || w4_max_weights_ == 0) return false;
  const size_t need = w4_max_weights_ * 2;
  if (w4_deq_.bytes() >= need) return true;
  if (capturing_) return false;  // never allocate inside a graph capture: the W4 kernel takes this one
  SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
  try {
    w4_deq_ = DeviceBuffer(need);
  } catch (const Error&) {  // no room for the scratch matrix: the W4 kernel for every size from now on
    w4_dequant_min_m_ = 0;
    return false;
  }
  return true;
}

void CudaBackend::w4_gemm(const CudaLinear& l, const Tensor& x, Tensor& out) {
  __nv_bfloat16* y = bf(out);
  const auto* bias = l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr;
  const int m = int(x.rows);
  if (w4_dequant_ready(m)) {
    auto prof = prof_->scope("linear.w4_dequant_cublas");
    w4a16_dequantize(l.w4, w4_deq_.as<__nv_bfloat16>(), stream_);
    cublas_linear(w4_deq_.get(), l.out_features, l.in_features, x.data, m, bias, y, false);  // as a dense linear
    return;
  }
  tune_w4_once(bf(x), int(x.rows), &l.w4, 1, &y);
  auto prof = prof_->scope("linear.w4a16");
  w4a16_gemm(bf(x), int(x.rows), l.w4, bias, y, w4_ws_.get(), w4_ws_.bytes(), sm_count_, stream_);
}

void CudaBackend::linear_no_ec(const CudaLinear& l, const Tensor& x, Tensor& out) {
  if (l.quantized)
    w4_gemm(l, x, out);
  else
    dense_gemm(l, x, out);
}

// Tensor parallelism's row-parallel compensated linear: the gate needs the full A·x, so the EC runs naive in
// two halves around the all-reduce (the fused and overlapped paths would apply the gate to a partial sum).
void CudaBackend::linear_ec_partial(const Tensor& x, const Linear& lin, Tensor& out, Tensor& z) {
  const auto& l = static_cast<const CudaLinear&>(lin);
  SPEAR_CHECK(l.ec, "linear_ec_partial: '{}' has no compensator attached", l.name);
  const int T = int(x.rows);
  SPEAR_CHECK(x.device == Device::CUDA && x.dtype == DType::BF16 && x.cols == l.in_features,
              "linear_ec_partial: '{}' takes a bf16 GPU input [T, {}], got {} [{}, {}]", l.name, l.in_features,
              dtype_name(x.dtype), x.rows, x.cols);
  SPEAR_CHECK(out.device == Device::CUDA && out.dtype == DType::BF16 && out.rows == T && out.cols == l.out_features,
              "linear_ec_partial: '{}' writes a bf16 GPU output [{}, {}], got {} [{}, {}]", l.name, T, l.out_features,
              dtype_name(out.dtype), out.rows, out.cols);
  SPEAR_CHECK(z.device == Device::CUDA && z.dtype == DType::F32 && z.rows == T && z.cols == l.ec->rank,
              "linear_ec_partial: '{}' needs an fp32 GPU z [{}, {}] (alloc_f32), got {} [{}, {}]", l.name, T,
              l.ec->rank, dtype_name(z.dtype), z.rows, z.cols);
  if (T == 0) return;
  linear_no_ec(l, x, out);
  auto prof = prof_->scope("linear.ec_project");
  ec_project(*l.ec, x, z);
}

void CudaBackend::ec_expand(const Tensor& z, const Linear& lin, Tensor& out) {
  const auto& l = static_cast<const CudaLinear&>(lin);
  SPEAR_CHECK(l.ec, "ec_expand: '{}' has no compensator attached", l.name);
  SPEAR_CHECK(z.device == Device::CUDA && z.dtype == DType::F32 && z.cols == l.ec->rank,
              "ec_expand: '{}' needs an fp32 GPU z [T, {}], got {} [{}, {}]", l.name, l.ec->rank, dtype_name(z.dtype),
              z.rows, z.cols);
  SPEAR_CHECK(
      out.device == Device::CUDA && out.dtype == DType::BF16 && out.rows == z.rows && out.cols == l.out_features,
      "ec_expand: '{}' adds into a bf16 GPU output [{}, {}], got {} [{}, {}]", l.name, z.rows, l.out_features,
      dtype_name(out.dtype), out.rows, out.cols);
  if (z.rows == 0) return;
  auto prof = prof_->scope("linear.ec_expand");
  ec_expand_naive(*l.ec, z, out);
}

namespace {

EcTermArgs ec_term_args(const CudaEc& c, const Tensor& x) {
  EcTermArgs t;
  t.rank = c.rank;
  t.gate_width = c.gate_width;
  t.k = c.in;
  t.xin = bf(x);
  t.A = c.A16.as<__nv_bfloat16>();
  t.B = c.B16.as<__nv_bfloat16>();
  if (c.gate_width > 0) {
    t.W1 = c.W1.as<float>();
    t.b1 = c.b1.as<float>();
    t.W2 = c.W2.as<float>();
    t.b2 = c.b2.as<float>();
  }
  return t;
}

}  // namespace

namespace {

struct EcApplyArgs {
  int count = 0;
  EcTermArgs ec[kEcApplyMax];
  int n[kEcApplyMax] = {};
  __nv_bfloat16* y[kEcApplyMax] = {};
};

EcApplyArgs ec_apply_args(std::span<const CudaLinear* const> ls, const Tensor& x, std::span<Tensor* const> outs) {
  EcApplyArgs a;
  a.count = int(ls.size());
  for (int i = 0; i < a.count && i < kEcApplyMax; ++i)
    a.ec[i] = ec_term_args(*ls[size_t(i)]->ec, x), a.n[i] = ls[size_t(i)]->out_features, a.y[i] = bf(*outs[size_t(i)]);
  return a;
}

}  // namespace

bool CudaBackend::defers_ec(std::span<const CudaLinear* const> ls, const Tensor& x,
                            std::span<Tensor* const> outs) const {
  const int m = int(x.rows);
  if (!ec_defer_ || ls.empty() || ls.size() > size_t(kEcApplyMax) || m < ec_defer_min_m_ || m > 32 || tp_size() > 1)
    return false;
  for (const CudaLinear* l : ls)
    if (!l->ec || !l->quantized) return false;
  if (outs.empty()) return true;  // the norm launch's conditions are checked by its caller
  if (!ec_defer_groups_) return false;
  const EcApplyArgs a = ec_apply_args(ls, x, outs);
  return ec_apply_takes(a.count, a.n, a.ec, a.y);
}

void CudaBackend::apply_deferred_ecs(std::span<const CudaLinear* const> ls, const Tensor& x,
                                     std::span<Tensor* const> outs) {
  const EcApplyArgs a = ec_apply_args(ls, x, outs);
  for (const CudaLinear* l : ls)
    if (verbose_ && ec_reported_.insert({l, -token_bucket(int(x.rows))}).second)
      std::fprintf(stderr, "ec deferred: %s, %d tokens: the whole term in a launch of its own after a plain GEMM\n",
                   l->name.c_str(), int(x.rows));
  auto prof = prof_->scope("linear.ec_deferred");
  ec_apply_bf16(a.count, a.n, a.ec, a.y, int(x.rows), stream_);
  ++deferred_ec_launches_;
}

bool CudaBackend::linear_deferred(const CudaLinear& l, const Tensor& x, Tensor& out) {
  const CudaLinear* self[1] = {&l};
  Tensor* self_out[1] = {&out};
  if (!defers_ec(self, x, self_out)) return false;
  w4_gemm(l, x, out);
  apply_deferred_ecs(self, x, self_out);
  return true;
}

bool CudaBackend::linear_group_deferred(const Tensor& x, std::span<const Linear* const> ls,
                                        std::span<Tensor* const> outs, const W4Device* w,
                                        const __nv_bfloat16* const* bias, __nv_bfloat16* const* y) {
  std::array<const CudaLinear*, kW4MaxGrouped> with_ec{};
  std::array<Tensor*, kW4MaxGrouped> ec_outs{};
  size_t n = 0;
  for (size_t i = 0; i < ls.size() && i < size_t(kW4MaxGrouped); ++i)
    if (static_cast<const CudaLinear*>(ls[i])->ec)
      with_ec[n] = static_cast<const CudaLinear*>(ls[i]), ec_outs[n++] = outs[i];
  const std::span<const CudaLinear* const> members(with_ec.data(), n);
  const std::span<Tensor* const> member_outs(ec_outs.data(), n);
  if (!defers_ec(members, x, member_outs)) return false;
  const int m = int(x.rows), count = int(ls.size());
  tune_w4_once(bf(x), m, w, count, y);
  {
    auto prof = prof_->scope("linear.w4a16_grouped");
    w4a16_gemm_grouped(bf(x), m, w, count, bias, y, w4_ws_.get(), w4_ws_.bytes(), sm_count_, stream_);
  }
  apply_deferred_ecs(members, x, member_outs);
  return true;
}

// The deferred EC with the residual add and the next norm: the compensated linear's W4 launch runs plain (its own
// tuned plan) and the norm launch computes the whole term before the add (ec_after_gemm.h).
bool CudaBackend::linear_residual_norm(const Tensor& in, const Linear& lin, Tensor& x, const Tensor& norm_w, float eps,
                                       Tensor& h) {
  const auto& l = static_cast<const CudaLinear&>(lin);
  const int T = int(x.rows), H = int(x.cols);
  const CudaLinear* self[1] = {&l};
  if (!defers_ec(self, in, {})) return false;
  auto bf16_gpu = [](const Tensor& t) { return t.device == Device::CUDA && t.dtype == DType::BF16; };
  if (!bf16_gpu(in) || !bf16_gpu(x) || !bf16_gpu(h) || !bf16_gpu(norm_w)) return false;
  SPEAR_CHECK(in.rows == T && in.cols == l.in_features && H == l.out_features && norm_w.numel() == H && h.rows == T &&
                  h.cols == H,
              "linear_residual_norm: '{}' [{} -> {}] with input [{}, {}], x [{}, {}], norm weight {}, h [{}, {}]",
              l.name, l.in_features, l.out_features, in.rows, in.cols, x.rows, x.cols, norm_w.numel(), h.rows, h.cols);
  if (h.data == x.data || h.data == in.data || w4_dequant_ready(T)) return false;
  if (choose_ec_path(l, in) != EcPath::Fused) return false;
  Tensor y = alloc(T, H);
  const EcTermArgs term = ec_term_args(*l.ec, in);
  if (!add_rms_norm_ec_takes(H, term, x.data, y.data, norm_w.data, h.data)) return false;
  if (verbose_ && ec_reported_.insert({&l, -token_bucket(T)}).second)  // beside the dispatch line (positive buckets)
    std::fprintf(stderr, "ec deferred: %s, %d tokens: the whole term in the residual add + norm launch after a plain "
                 "GEMM (SPEAR_EC_DEFER=0: in the GEMM launch)\n", l.name.c_str(), T);
  w4_gemm(l, in, y);
  auto prof = prof_->scope("add_rms_norm_ec");
  add_rms_norm_ec_bf16(bf(x), bf(y), term, bf(norm_w), bf(h), T, H, eps, stream_);
  ++deferred_ec_launches_;
  return true;
}

EcPath CudaBackend::choose_ec_path(const CudaLinear& l, const Tensor& x) {
  const int m = int(x.rows);
  const CudaEc& ec = *l.ec;
  const W4EcDevice* dev = &ec.dev;
  const bool fusable = l.quantized && (reinterpret_cast<uintptr_t>(x.data) & 15) == 0 &&
                       w4a16_get_options().path != 2 && w4a16_ec_fusable(m, &l.w4, 1, &dev);
  EcPath p = ec_path_;
  const char* why = "forced";
  if (p == EcPath::Auto && ec_table_) {
    p = ec_table_->lookup(ec.out, ec.in, ec.rank, ec.gate_width, m);
    why = "dispatch table";
  }
  if (p == EcPath::Auto) {
    // Built-in rule: fused wherever the decode kernel takes it (m <= 32), else overlapped.
    p = fusable ? EcPath::Fused : EcPath::Overlapped;
    why = "built-in rule";
  }
  if (p == EcPath::Fused && !fusable) {
    p = ec_path_ == EcPath::Fused ? EcPath::Naive : EcPath::Overlapped;
    why = ec_path_ == EcPath::Fused ? "forced fused, not fusable here" : "dispatch table said fused, not fusable here";
  }
  if (verbose_ && ec_reported_.insert({&l, token_bucket(m)}).second)
    std::fprintf(stderr, "ec dispatch: %s [%d x %d] rank %d gate %d, %d tokens: %s (%s)\n", l.name.c_str(), ec.out,
                 ec.in, ec.rank, ec.gate_width, m, ec_path_name(p), why);
  return p;
}

Tensor CudaBackend::ec_overlap_fork(const CudaEc& ec, const Tensor& x) {
  const int T = int(x.rows), r = ec.rank;
  // Allocated here, on the main stream's timeline: it returns to the pool only after the join (the caller holds it).
  Tensor z = alloc_f32(T, r);
  SPEAR_CUDA_CHECK(cudaEventRecord(ev_fork_, stream_));
  SPEAR_CUDA_CHECK(cudaStreamWaitEvent(ec_stream_, ev_fork_, 0));
  const float alpha = 1.f, beta = 0.f;
  // z[T, r] = x[T, k] · A16ᵀ (bf16 in, fp32 out)
  SPEAR_CUBLAS_CHECK(cublasGemmEx(cublas_ec_, CUBLAS_OP_T, CUBLAS_OP_N, r, T, ec.in, &alpha, ec.A16.get(),
                                     CUDA_R_16BF, ec.in, x.data, CUDA_R_16BF, ec.in, &beta, z.data, CUDA_R_32F, r,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (ec.gate_width > 0)  // g ⊙ z in place
    ec_gate_rows_f32(z.ptr<float>(), ec.W1.as<float>(), ec.b1.as<float>(), ec.W2.as<float>(), ec.b2.as<float>(),
                     z.ptr<float>(), T, r, ec.gate_width, ec_stream_);
  SPEAR_CUDA_CHECK(cudaEventRecord(ev_join_, ec_stream_));
  return z;
}

void CudaBackend::ec_overlap_join(const CudaEc& ec, const Tensor& zg, Tensor& y) {
  SPEAR_CUDA_CHECK(cudaStreamWaitEvent(stream_, ev_join_, 0));
  auto prof = prof_->scope("linear.ec_overlap_add");
  ec_expand_add_bf16(bf(y), zg.ptr<float>(), ec.B.as<float>(), int(y.rows), int(y.cols), ec.rank, stream_);
}

std::vector<Backend::EcTiming> CudaBackend::time_ec_paths(std::span<const Linear* const> ls,
                                                          std::span<const int> tokens, int reps) {
  SPEAR_CHECK(!ls.empty(), "time_ec_paths: no linears");
  SPEAR_CHECK(!capturing_, "time_ec_paths inside a graph capture");
  const auto& l0 = static_cast<const CudaLinear&>(*ls[0]);
  for (const Linear* p : ls) {
    const auto& l = static_cast<const CudaLinear&>(*p);
    SPEAR_CHECK(l.ec, "time_ec_paths: '{}' has no compensator", l.name);
    SPEAR_CHECK(l.in_features == l0.in_features && l.out_features == l0.out_features && l.quantized == l0.quantized &&
                    l.ec->rank == l0.ec->rank && l.ec->gate_width == l0.ec->gate_width,
                "time_ec_paths: '{}' differs in shape from '{}'", l.name, l0.name);
  }
  reps = std::max(reps, 1);
  const EcPath saved = ec_path_;
  const bool saved_verbose = verbose_;
  verbose_ = false;
  cudaEvent_t ev[2];
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[0]));
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[1]));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  // As in a decode step: calls back to back in one CUDA graph (PDL edges between them), cycling over the
  // model's linears of this shape so that their weights come from DRAM when they do not fit in L2 together.
  const int calls = std::max<int>(int(ls.size()), 16);
  auto timed = [&](const std::function<void(const CudaLinear&)>& call) {
    for (const Linear* p : ls) call(static_cast<const CudaLinear&>(*p));  // eager: plan tuning, heuristics, pool
    SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cudaGraphExec_t exec = capture_graph([&] {
      for (int c = 0; c < calls; ++c) call(static_cast<const CudaLinear&>(*ls[size_t(c) % ls.size()]));
    });
    std::vector<float> ms;
    SPEAR_CUDA_CHECK(cudaGraphLaunch(exec, stream_));  // warm
    for (int r = 0; r < reps; ++r) {
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[0], stream_));
      SPEAR_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[1], stream_));
      SPEAR_CUDA_CHECK(cudaEventSynchronize(ev[1]));
      float v = 0.f;
      SPEAR_CUDA_CHECK(cudaEventElapsedTime(&v, ev[0], ev[1]));
      ms.push_back(v);
    }
    cudaGraphExecDestroy(exec);
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return 1e3 * double(ms[ms.size() / 2]) / calls;
  };
  std::vector<EcTiming> out;
  auto restore = [&] {
    ec_path_ = saved, verbose_ = saved_verbose;
    cudaEventDestroy(ev[0]);
    cudaEventDestroy(ev[1]);
  };
  try {
    for (int m : tokens) {
      std::vector<float> hx(size_t(m) * l0.in_features);
      for (float& v : hx) v = nd(rng);
      Tensor x = upload(hx.data(), m, l0.in_features), y = alloc(m, l0.out_features);
      EcTiming t;
      t.m = m;
      if (l0.quantized) t.base_us = timed([&](const CudaLinear& l) { w4_gemm(l, x, y); });
      for (EcPath p : {EcPath::Naive, EcPath::Overlapped, EcPath::Fused}) {
        ec_path_ = p;
        if (choose_ec_path(l0, x) != p) continue;  // fused where the kernel does not take it
        t.us[p] = timed([&](const CudaLinear& l) { linear(x, l, y); });
      }
      out.push_back(std::move(t));
    }
  } catch (...) {
    restore();
    throw;
  }
  restore();
  return out;
}

}  // namespace spear::cuda

namespace spear::cuda {

// The compensated gate / up pair whose EC terms the SwiGLU launch adds (swiglu_ec.h): the grouped W4 launch runs the
// plain plan (tuned as the plain launch) with EC CTAs that leave g ⊙ z, which nothing in that launch waits for.
bool CudaBackend::linear_swiglu(const Tensor& in, const Linear& gate_lin, const Linear& up_lin, Tensor& gate_out,
                                Tensor& up_out) {
  const int m = int(in.rows);
  if (tp_size() > 1 || m < 1 || m > ec_swiglu_max_m_ || w4_dequant_ready(m)) return false;
  const CudaLinear* ls[2] = {static_cast<const CudaLinear*>(&gate_lin), static_cast<const CudaLinear*>(&up_lin)};
  if (!ls[0]->ec && !ls[1]->ec) return false;
  auto bf16_gpu = [](const Tensor& t) { return t.device == Device::CUDA && t.dtype == DType::BF16; };
  if (!bf16_gpu(in) || !bf16_gpu(gate_out) || !bf16_gpu(up_out)) return false;
  W4Device w[2];
  const __nv_bfloat16* bias[2];
  __nv_bfloat16* y[2] = {bf(gate_out), bf(up_out)};
  const W4EcDevice* ec[2] = {};
  for (int i = 0; i < 2; ++i) {
    const CudaLinear& l = *ls[i];
    if (!l.quantized || l.in_features != in.cols || l.out_features != ls[0]->out_features) return false;
    if (l.ec && choose_ec_path(l, in) != EcPath::Fused) return false;
    w[i] = l.w4;
    bias[i] = l.bias.bytes() ? l.bias.as<__nv_bfloat16>() : nullptr;
    if (l.ec) ec[i] = &l.ec->dev;
  }
  const int n = ls[0]->out_features;
  SPEAR_CHECK(gate_out.rows == m && gate_out.cols == n && up_out.rows == m && up_out.cols == n,
              "linear_swiglu: outputs [{}, {}] and [{}, {}] for '{}' / '{}' of {} tokens -> {}", gate_out.rows,
              gate_out.cols, up_out.rows, up_out.cols, ls[0]->name, ls[1]->name, m, n);
  if (!w4a16_ec_fusable(m, w, 2, ec) || (reinterpret_cast<uintptr_t>(in.data) & 15) != 0) return false;
  Tensor gz[2];
  float* gzp[2] = {};
  SwigluEcTerm term[2];
  for (int i = 0; i < 2; ++i) {
    if (!ls[i]->ec) continue;
    gz[i] = alloc_f32(m, ls[i]->ec->rank);
    gzp[i] = gz[i].ptr<float>();
    term[i] = {ls[i]->ec->B16.as<__nv_bfloat16>(), gzp[i], ls[i]->ec->rank};
  }
  if (!swiglu_ec_takes(m, term[0], term[1])) return false;
  tune_w4_once(bf(in), m, w, 2, y);  // the plain launch's plan: the projection runs it with the EC CTAs added
  bool done = false;
  {
    auto prof = prof_->scope("linear.w4a16_grouped_ec_project");
    done = w4a16_gemm_ec_project_group(bf(in), m, w, 2, ec, bias, y, gzp, sm_count_, stream_);
  }
  if (!done) return false;
  if (verbose_)
    for (const CudaLinear* l : ls)
      if (l->ec && ec_reported_.insert({l, -token_bucket(m)}).second)
        std::fprintf(stderr, "ec swiglu: %s, %d tokens: g ⊙ z beside the plain GEMM launch, the term in the SwiGLU "
                     "launch (SPEAR_EC_SWIGLU=0: in the GEMM launch)\n", l->name.c_str(), m);
  auto prof = prof_->scope("swiglu_ec");
  swiglu_ec_bf16(bf(gate_out), bf(up_out), bf(gate_out), m, n, term[0], term[1], stream_);
  ++ec_swiglu_launches_;
  return true;
}

}  // namespace spear::cuda
