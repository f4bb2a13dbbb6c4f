// The CUDA backend's decode-step fusions (Backend::linear_fused): the W4 decode kernels with the RMSNorm or
// SwiGLU before a linear in their x staging and the residual add after it in their epilogue (w4a16_gemm.h:
// W4Fusion). A decode layer then runs as q/k/v (norm fused), RoPE, attention, o (residual fused), gate/up (norm
// fused), down (SwiGLU and residual fused): six launches instead of nine, every W4 launch but q/k/v right after
// another W4 launch, whose early PDL trigger lets its weights stream meanwhile.
#include <cuda_bf16.h>

#include "backend/cuda/cuda_backend.h"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

__nv_bfloat16* bf(const Tensor& t) { return static_cast<__nv_bfloat16*>(t.data); }

const char* fusion_scope(const Backend::LinearFusion& f) {
  if (f.norm_w) return f.residual ? "linear.w4a16_fused_norm_residual" : "linear.w4a16_fused_norm";
  if (f.swiglu_up) return f.residual ? "linear.w4a16_fused_swiglu_residual" : "linear.w4a16_fused_swiglu";
  return "linear.w4a16_fused_residual";
}

}  // namespace

bool CudaBackend::linear_fused(const Tensor& in, std::span<const Linear* const> ls, std::span<Tensor* const> outs,
                               const LinearFusion& f) {
  const int count = int(ls.size()), m = int(in.rows);
  if (!decode_fusion_on_ || count < 1 || count > kW4MaxGrouped || outs.size() != ls.size() || m < 1) return false;
  if (f.residual && fused_mlp_on_) return false;  // the fused MLP block takes the o projection's output instead
  if (in.dtype != DType::BF16 || (f.norm_w && f.norm_w->dtype != DType::BF16) ||
      (f.swiglu_up && f.swiglu_up->dtype != DType::BF16))
    return false;
  W4Device w[kW4MaxGrouped];
  const __nv_bfloat16* bias[kW4MaxGrouped];
  __nv_bfloat16* y[kW4MaxGrouped];
  for (int i = 0; i < count; ++i) {
    const auto* c = static_cast<const CudaLinear*>(ls[size_t(i)]);
    const Tensor& o = *outs[size_t(i)];
    if (!c->quantized || c->ec) return false;
    SPEAR_CHECK(c->in_features == in.cols && o.dtype == DType::BF16 && o.rows == in.rows && o.cols == c->out_features,
                "linear_fused: input [{}, {}] and output [{}, {}] do not fit '{}' ({} -> {})", in.rows, in.cols,
                o.rows, o.cols, c->name, c->in_features, c->out_features);
    w[i] = c->w4;
    bias[i] = c->bias.bytes() ? c->bias.as<__nv_bfloat16>() : nullptr;
    y[i] = bf(o);
  }
  SPEAR_CHECK(!f.norm_w || f.norm_w->numel() == in.cols, "linear_fused: norm weights of {} for width {}",
              f.norm_w ? f.norm_w->numel() : 0, in.cols);
  SPEAR_CHECK(!f.swiglu_up || (f.swiglu_up->rows == in.rows && f.swiglu_up->cols == in.cols),
              "linear_fused: up projection [{}, {}] for gate [{}, {}]", f.swiglu_up ? f.swiglu_up->rows : 0,
              f.swiglu_up ? f.swiglu_up->cols : 0, in.rows, in.cols);
  W4Fusion wf;
  wf.norm_w = f.norm_w ? bf(*f.norm_w) : nullptr;
  wf.eps = f.eps;
  wf.up = f.swiglu_up ? bf(*f.swiglu_up) : nullptr;
  wf.residual = f.residual;
  if (!w4a16_fusable(m, w, count, wf, bf(in))) return false;
  // The plan is the plain launch's: tuned at its first eager use, the results into scratch where y holds the
  // residual stream (the tuner writes them).
  if (tune_w4_ && !capturing_ && !w4a16_decode_tuned(m, w, count)) {
    Tensor scratch[kW4MaxGrouped];
    __nv_bfloat16* ty[kW4MaxGrouped];
    for (int i = 0; i < count; ++i) {
      if (f.residual) scratch[i] = alloc(m, outs[size_t(i)]->cols);
      ty[i] = f.residual ? bf(scratch[i]) : y[i];
    }
    tune_w4_once(bf(in), m, w, count, ty);
  }
  auto prof = prof_->scope(fusion_scope(f));
  if (!w4a16_gemm_fused(bf(in), m, w, count, wf, bias, y, sm_count_, stream_)) return false;
  ++fused_linear_launches_;
  return true;
}

}  // namespace spear::cuda
