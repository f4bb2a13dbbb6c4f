#include "spear/closed_form_stage.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <set>

#include <Eigen/Core>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace spear {

namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Modules of a layer grouped by what they read: q/k/v the attention input, o the attention output,
// gate/up the MLP input, down the MLP activation. A group's inputs depend on the groups before it.
const std::vector<std::vector<std::string>> kGroups = {
    {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.o_proj"},
    {"mlp.gate_proj", "mlp.up_proj"}, {"mlp.down_proj"}};

struct Stats {
  int out = 0, in = 0;
  MatD R, C;                  // Σ x xᵀ [in, in]; Σ (y_fp − Q x) xᵀ [out, in]
  std::vector<double> abs_x;  // Σ |x|
  long n = 0;
  std::vector<float> y_fp;    // this chunk's full-precision output of the module
};

}  // namespace

std::vector<Compensator> fit_closed_form(Model& fp, Model& qm, const std::string& model_dir,
                                         const std::map<std::string, PackedQuantWeights>& quantized,
                                         const Placement& placement, const std::vector<std::vector<int32_t>>& seqs,
                                         const ClosedFormOptions& o, nlohmann::json& report) {
  using clk = std::chrono::steady_clock;
  Backend& be = fp.backend();
  const ModelConfig& c = fp.config();
  if (seqs.empty()) fail("closed-form stage: no calibration sequences");
  const int len = int(seqs[0].size());
  std::map<std::string, const PlacedModule*> placed;
  for (const auto& p : placement.modules) placed[p.module] = &p;

  struct Chunk {
    Batch batch;
    Tensor x_fp, x_q;
  };
  std::vector<Chunk> chunks;
  const int cs = std::max(1, o.chunk_sequences);
  for (size_t s0 = 0; s0 < seqs.size(); s0 += size_t(cs)) {
    Chunk ch;
    for (size_t s = s0; s < std::min(seqs.size(), s0 + size_t(cs)); ++s) {
      if (int(seqs[s].size()) != len) fail("closed-form stage: calibration sequences must have equal lengths");
      ch.batch.seqs.push_back({int(ch.batch.tokens.size()), len, 0, int(s - s0)});
      ch.batch.tokens.insert(ch.batch.tokens.end(), seqs[s].begin(), seqs[s].end());
    }
    ch.x_fp = fp.embed(ch.batch);
    ch.x_q = qm.embed(ch.batch);
    chunks.push_back(std::move(ch));
  }
  auto cache_fp = fp.make_kv_cache(cs, len), cache_q = qm.make_kv_cache(cs, len);
  auto copy = [&](const Tensor& t) {
    Tensor r = be.alloc(t.rows, t.cols);
    std::memcpy(r.data, t.data, t.nbytes());
    return r;
  };

  Checkpoint ck(model_dir);
  std::vector<Compensator> out;
  report = nlohmann::json::array();
  ProgressBar bar("stage 1: closed-form compensators", long(placement.modules.size()));
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (const auto& group : kGroups) {
      std::map<std::string, Stats> st;
      for (const auto& g : group)
        if (placed.count(prefix + g)) {
          const Linear& lin = *qm.linear_slot(prefix + g);
          Stats& s = st[prefix + g];
          s.out = lin.out_features, s.in = lin.in_features;
          s.R = MatD::Zero(s.in, s.in);
          s.C = MatD::Zero(s.out, s.in);
          s.abs_x.assign(size_t(s.in), 0.0);
        }
      if (st.empty()) continue;
      auto t0 = clk::now();
      for (auto& ch : chunks) {
        TapFn fp_tap = [&](const std::string& name, TapPoint pt, const Tensor& t) {
          auto it = st.find(name);
          if (it == st.end() || pt != TapPoint::Output) return;
          it->second.y_fp.resize(size_t(t.rows * t.cols));
          be.download(t, it->second.y_fp.data());
        };
        Tensor xf = copy(ch.x_fp);
        fp.run_layer(l, xf, ch.batch, *cache_fp, &fp_tap);
        std::vector<float> x_in;
        TapFn q_tap = [&](const std::string& name, TapPoint pt, const Tensor& t) {
          auto it = st.find(name);
          if (it == st.end()) return;
          Stats& s = it->second;
          const long T = long(t.rows);
          if (pt == TapPoint::Input) {
            x_in.resize(size_t(T) * s.in);
            be.download(t, x_in.data());
            return;
          }
          std::vector<float> y(size_t(T) * s.out);
          be.download(t, y.data());
          Eigen::Map<const MatF> X(x_in.data(), T, s.in), Yq(y.data(), T, s.out), Yf(s.y_fp.data(), T, s.out);
          MatD Xd = X.cast<double>();
          MatD E = (Yf - Yq).cast<double>();
          s.R.noalias() += Xd.transpose() * Xd;
          s.C.noalias() += E.transpose() * Xd;
          for (long r = 0; r < T; ++r)
            for (int j = 0; j < s.in; ++j) s.abs_x[size_t(j)] += std::abs(double(x_in[size_t(r) * s.in + j]));
          s.n += T;
        };
        Tensor xq = copy(ch.x_q);
        qm.run_layer(l, xq, ch.batch, *cache_q, &q_tap);
      }
      const double stats_s = std::chrono::duration<double>(clk::now() - t0).count();
      for (auto& [name, s] : st) {
        auto t1 = clk::now();
        const PlacedModule& pm = *placed.at(name);
        const double inv_n = 1.0 / double(std::max(1L, s.n));
        MatD R = s.R * inv_n, C = s.C * inv_n;
        std::vector<double> mean_abs(s.abs_x.size());
        for (size_t j = 0; j < mean_abs.size(); ++j) mean_abs[j] = s.abs_x[j] * inv_n;
        // dW = W − Q in fp64.
        std::vector<float> w = ck.get(name + ".weight").to_f32();
        QuantizedMatrix qmx = unpack_quantized(quantized.at(name));
        std::vector<float> wq = qmx.dequantize();
        MatD dW(s.out, s.in);
        for (long i = 0; i < dW.size(); ++i) dW.data()[i] = double(w[size_t(i)]) - double(wq[size_t(i)]);
        LowRankFactors f = o.init == EcInit::Regression
                               ? regression_init(pm.rank, s.out, s.in, C.data(), R.data())
                               : closed_form_init(o.init, pm.rank, s.out, s.in, dW.data(), R.data(), mean_abs.data());
        Compensator ec;
        ec.module = name;
        ec.resize(s.in, s.out, pm.rank, 0);
        ec.A = f.A;
        ec.B = f.B;
        // Residual the compensator should produce, in the R-weighted norm, before and after (local view).
        const double before = (dW * R).cwiseProduct(dW).sum();
        const double after = weighted_error(s.out, s.in, dW.data(), ec.A.data(), ec.B.data(), pm.rank, R.data());
        if (pm.gate_width > 0) {
          // E‖z‖² = tr(A R Aᵀ): scale W1 so the gate's hidden pre-activations are of order gate_init_std.
          Eigen::Map<const MatF> A(ec.A.data(), pm.rank, s.in);
          MatD Ad = A.cast<double>();
          const double ez2 = std::max((Ad * R * Ad.transpose()).trace(), 1e-12);
          ec.init_gate(pm.gate_width, float(o.gate_init_std / std::sqrt(ez2)), o.seed * 1000003ull + out.size());
        }
        qm.backend().set_compensator(*qm.linear_slot(name), &ec);
        report.push_back({{"module", name}, {"rank", pm.rank}, {"weighted_error_before", before},
                          {"weighted_error_after", after}, {"tokens", s.n},
                          {"seconds", stats_s / double(st.size()) + std::chrono::duration<double>(clk::now() - t1).count()}});
        out.push_back(std::move(ec));
        bar.update(long(out.size()));
      }
    }
    for (auto& ch : chunks) {  // advance both residual streams through layer l
      fp.run_layer(l, ch.x_fp, ch.batch, *cache_fp);
      qm.run_layer(l, ch.x_q, ch.batch, *cache_q);
    }
  }
  bar.finish();
  return out;
}

}  // namespace spear
