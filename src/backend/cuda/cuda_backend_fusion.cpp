// The CUDA backend's decode-step fusions (Backend::linear_fused): the W4 decode kernels with the residual add in
// their epilogue and the next element-wise step inside the launch (w4a16_gemm.h: W4Fusion). With all of them on
// (SPEAR_DECODE_FUSION=7) a decode layer runs as q/k/v, RoPE, attention, o (+ residual, + the MLP's RMSNorm),
// gate/up (+ SwiGLU), down (+ residual, + the next layer's RMSNorm): six launches instead of nine. By default none
// runs: on the H200 each now measures no faster than the launches it replaces (CudaBackend::set_decode_fusion).
// Linears with a compensator dispatched to the fused path keep their fusions: the EC's terms and the tails share the
// launch.
#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <string>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "core/dtype.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

__nv_bfloat16* bf(const Tensor& t) { return static_cast<__nv_bfloat16*>(t.data); }

const char* fusion_scope(const Backend::LinearFusion& f) {
  if (f.swiglu_out) return "linear.w4a16_fused_swiglu";
  if (f.norm_out) return f.residual ? "linear.w4a16_fused_residual_norm" : "linear.w4a16_fused_norm";
  return "linear.w4a16_fused_residual";
}

const char* fusion_scope_ec(const Backend::LinearFusion& f) {
  if (f.swiglu_out) return "linear.w4a16_ec_fused_swiglu";
  if (f.norm_out) return f.residual ? "linear.w4a16_ec_fused_residual_norm" : "linear.w4a16_ec_fused_norm";
  return "linear.w4a16_ec_fused_residual";
}

}  // namespace

bool CudaBackend::linear_fused(const Tensor& in, std::span<const Linear* const> ls, std::span<Tensor* const> outs,
                               const LinearFusion& f) {
  const int count = int(ls.size()), m = int(in.rows);
  if (count < 1 || count > kW4MaxGrouped || outs.size() != ls.size() || m < 1 || m > decode_fusion_max_m_) return false;
  const std::string& name = static_cast<const CudaLinear*>(ls[0])->name;
  const int bit = f.swiglu_out ? 2 : name.ends_with("down_proj") ? 4 : 1;
  if (!(decode_fusion_mask_ & bit)) return false;
  if (f.residual && fused_mlp_on_) return false;  // the fused MLP block takes the o projection's output instead
  if (in.dtype != DType::BF16 || (f.norm_out && (f.norm_out->dtype != DType::BF16 || !f.norm_w)) ||
      (f.swiglu_out && f.swiglu_out->dtype != DType::BF16))
    return false;
  W4Device w[kW4MaxGrouped];
  const __nv_bfloat16* bias[kW4MaxGrouped];
  __nv_bfloat16* y[kW4MaxGrouped];
  const W4EcDevice* ec[kW4MaxGrouped] = {};
  bool any_ec = false;
  for (int i = 0; i < count; ++i) {
    const auto* c = static_cast<const CudaLinear*>(ls[size_t(i)]);
    const Tensor& o = *outs[size_t(i)];
    if (!c->quantized) return false;
    // A compensator rides along where its dispatch says fused (the fused EC's launch with the tails added; the
    // other EC paths add their term after the GEMM, so the tails would come too early).
    if (c->ec) {
      if (choose_ec_path(*c, in) != EcPath::Fused) return false;
      ec[i] = &c->ec->dev;
      any_ec = true;
    }
    SPEAR_CHECK(c->in_features == in.cols && o.dtype == DType::BF16 && o.rows == in.rows && o.cols == c->out_features,
                "linear_fused: input [{}, {}] and output [{}, {}] do not fit '{}' ({} -> {})", in.rows, in.cols, o.rows,
                o.cols, c->name, c->in_features, c->out_features);
    w[i] = c->w4;
    bias[i] = c->bias.bytes() ? c->bias.as<__nv_bfloat16>() : nullptr;
    y[i] = bf(o);
  }
  SPEAR_CHECK(
      !f.norm_out ||
          (f.norm_w->numel() == outs[0]->cols && f.norm_out->rows == in.rows && f.norm_out->cols == outs[0]->cols),
      "linear_fused: norm weights of {} and norm output [{}, {}] for output [{}, {}]", f.norm_w ? f.norm_w->numel() : 0,
      f.norm_out ? f.norm_out->rows : 0, f.norm_out ? f.norm_out->cols : 0, outs[0]->rows, outs[0]->cols);
  SPEAR_CHECK(!f.swiglu_out || (count == 2 && f.swiglu_out->rows == in.rows && f.swiglu_out->cols == outs[0]->cols &&
                                outs[1]->cols == outs[0]->cols),
              "linear_fused: SwiGLU output for {} linears of widths {} / {}", count, outs[0]->cols,
              count > 1 ? outs[1]->cols : 0);
  if ((f.norm_out || f.swiglu_out) && !fusion_counters_.get()) {
    SPEAR_CHECK(!capturing_, "cuda backend: fused-launch counters first needed inside a graph capture");
    fusion_counters_ = DeviceBuffer(w4a16_fusion_counter_bytes());
    SPEAR_CUDA_CHECK(cudaMemset(fusion_counters_.get(), 0, w4a16_fusion_counter_bytes()));
  }
  W4Fusion wf;
  wf.residual = f.residual;
  wf.norm_w = f.norm_w ? bf(*f.norm_w) : nullptr;
  wf.eps = f.eps;
  wf.norm_out = f.norm_out ? bf(*f.norm_out) : nullptr;
  wf.swiglu_out = f.swiglu_out ? bf(*f.swiglu_out) : nullptr;
  wf.counters = fusion_counters_.get() ? fusion_counters_.as<unsigned>() : nullptr;
  const W4EcDevice* const* ecs = any_ec ? ec : nullptr;
  if (!w4a16_fusable(m, w, count, wf, y, ecs)) return false;
  // The plan is the plain (or compensated) launch's, so that both sum in the same order: tuned at the shape's first
  // eager use. Here that is with the tails timed too, unless the launch adds into the residual stream (repeated
  // calls would add again): then plain, the results into scratch.
  if (tune_w4_ && !capturing_ && !w4a16_decode_tuned(m, w, count, ecs)) {
    Tensor scratch[kW4MaxGrouped];
    __nv_bfloat16* ty[kW4MaxGrouped];
    for (int i = 0; i < count; ++i) {
      if (f.residual) scratch[i] = alloc(m, outs[size_t(i)]->cols);
      ty[i] = f.residual ? bf(scratch[i]) : y[i];
    }
    tune_w4_once(bf(in), m, w, count, ty, ecs, f.residual ? nullptr : &wf);
  }
  auto prof = prof_->scope(any_ec ? fusion_scope_ec(f) : fusion_scope(f));
  if (!w4a16_gemm_fused(bf(in), m, w, count, wf, bias, y, sm_count_, stream_, ecs)) return false;
  if (!f.residual && tune_w4_ && !capturing_) {  // the launch that follows may be tuned behind a replay of this one
    std::array<W4Device, kW4MaxGrouped> rw;
    std::array<const __nv_bfloat16*, kW4MaxGrouped> rb;
    std::array<__nv_bfloat16*, kW4MaxGrouped> ry;
    std::array<const W4EcDevice*, kW4MaxGrouped> re;
    std::copy(w, w + count, rw.begin());
    std::copy(bias, bias + count, rb.begin());
    std::copy(y, y + count, ry.begin());
    std::copy(ec, ec + count, re.begin());
    const __nv_bfloat16* rx = bf(in);
    note_w4_launch([=, this] {
      w4a16_gemm_fused(rx, m, rw.data(), count, wf, rb.data(), ry.data(), sm_count_, stream_,
                       any_ec ? re.data() : nullptr);
    });
  }
  ++fused_linear_launches_;
  if (any_ec) ++fused_ec_linear_launches_;
  return true;
}

}  // namespace spear::cuda
