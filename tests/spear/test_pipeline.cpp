// Packages with compensators, the CPU backend applying them, placement under a budget, and a small end-to-end
// calibration on the bundled model (closed form and a few training steps).
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "eval/perplexity.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/package.h"
#include "spear/calibrate.h"
#include "spear/placement.h"
#include "test_util.h"

namespace spear {
namespace {

namespace fs = std::filesystem;

Diagnosis toy_diagnosis() {
  Diagnosis d;
  const char* kinds[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  const int outs[] = {512, 256, 256, 512, 1536, 1536, 512}, ins[] = {512, 512, 512, 512, 512, 512, 1536};
  double p_sum = 0;
  for (int l = 0; l < 4; ++l)
    for (int k = 0; k < 7; ++k) {
      ModuleDamage m;
      m.module = "model.layers." + std::to_string(l) + "." + (k < 4 ? "self_attn." : "mlp.") + kinds[k];
      m.layer = l;
      m.kind = kinds[k];
      m.out = outs[k];
      m.in = ins[k];
      m.damage = (k == 6 ? 10.0 : 1.0) * (l == 0 ? 5.0 : 1.0) * 1e-4;
      m.bytes_per_rank = compensator_bytes(m.in, m.out, 1, 0);
      d.modules.push_back(m);
      p_sum += m.damage;
    }
  for (auto& m : d.modules) {
    const double p = m.damage / p_sum;
    d.entropy -= p * std::log(p);
  }
  d.effective_modules = std::exp(d.entropy);
  return d;
}

TEST(Placement, EveryRuleStaysWithinTheBudget) {
  Diagnosis d = toy_diagnosis();
  for (const auto& rule : placement_rules())
    for (double budget : {0.0025, 0.01, 0.05}) {
      PlacementOptions o;
      o.rule = rule;
      o.budget = budget;
      o.model_bytes = 18'000'000;
      Placement p = place_compensators(d, o);
      size_t sum = 0;
      for (const auto& m : p.modules) {
        auto it = std::find_if(d.modules.begin(), d.modules.end(), [&](const ModuleDamage& x) { return x.module == m.module; });
        ASSERT_NE(it, d.modules.end());
        EXPECT_EQ(m.bytes, compensator_bytes(it->in, it->out, m.rank, m.gate_width));
        EXPECT_GE(m.rank, 1);
        sum += m.bytes;
      }
      EXPECT_EQ(sum, p.bytes);
      EXPECT_LE(p.bytes, size_t(budget * 18'000'000)) << rule;
      EXPECT_GT(p.bytes, size_t(0.5 * budget * 18'000'000)) << rule << " leaves most of the budget unused";
      size_t rank1_everywhere = 0;
      for (const auto& m : d.modules) rank1_everywhere += compensator_bytes(m.in, m.out, 1, o.gate_width);
      if (rule == "uniform" && rank1_everywhere <= p.budget_bytes) {  // rank >= 1 on every module when that fits
        EXPECT_EQ(p.modules.size(), d.modules.size()) << budget;
      }
    }
}

TEST(Placement, SpearRuleFollowsTheDamage) {
  Diagnosis d = toy_diagnosis();
  PlacementOptions o;
  o.rule = "spear";
  o.budget = 0.01;
  o.model_bytes = 18'000'000;
  Placement p = place_compensators(d, o);
  // The most damaged module (layer 0 down_proj) is chosen and has the highest rank.
  int best = 0;
  std::string best_mod;
  for (const auto& m : p.modules)
    if (m.rank > best) best = m.rank, best_mod = m.module;
  EXPECT_EQ(best_mod, "model.layers.0.mlp.down_proj");
  EXPECT_EQ(int(p.modules.size()), int(std::lround(d.effective_modules)));
  o.budget = 1e-7;
  EXPECT_SPEAR_ERROR(place_compensators(d, o), "too small");
  o.budget = 0.01;
  o.rule = "nope";
  EXPECT_SPEAR_ERROR(place_compensators(d, o), "unknown placement");
}

Compensator random_ec(const std::string& module, int in, int out, int r, int h, uint64_t seed) {
  Compensator c;
  c.module = module;
  c.resize(in, out, r, h);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.05f);
  for (auto* v : {&c.A, &c.B, &c.W1, &c.b1, &c.W2, &c.b2})
    for (float& x : *v) x = nd(rng);
  c.round_to_bf16();
  return c;
}

TEST(Package, CompensatorsRoundTripAndTheBackendAppliesThem) {
  const std::string dir = test::scratch_dir("ec_pkg");
  const std::string src = test::ref_model_dir();
  CpuBackend be;
  auto fp = Model::load(src, be);
  // A package whose only quantized module is layer 1's down_proj, with two compensators.
  std::map<std::string, PackedQuantWeights> q;
  {
    Checkpoint ck(src);
    std::vector<float> w = ck.get("model.layers.1.mlp.down_proj.weight").to_f32();
    QuantParams qp;
    q["model.layers.1.mlp.down_proj"] = pack_quantized(rtn_quantize(w.data(), 512, 1536, qp));
  }
  PackageManifest m;
  m.method = "rtn";
  m.quantized_modules = {"model.layers.1.mlp.down_proj"};
  std::vector<Compensator> ecs = {random_ec("model.layers.1.mlp.down_proj", 1536, 512, 6, 4, 1),
                                  random_ec("model.layers.0.self_attn.q_proj", 512, 512, 4, 0, 2)};
  write_package(dir, src, m, q, ecs);
  PackageManifest back = read_manifest(dir);
  ASSERT_EQ(back.compensators.size(), 2u);
  EXPECT_EQ(back.compensator_bytes, ecs[0].bytes() + ecs[1].bytes());
  auto with = Model::load(dir, be);
  auto without = Model::load(dir, be, LoadOptions{false});
  EXPECT_EQ(with->compensated_modules().size(), 2u);
  EXPECT_TRUE(without->compensated_modules().empty());

  // Forward with ECs = forward without ECs but with B·(g ⊙ A·x) added at the taps, checked through the
  // module outputs: run both with taps and compare the compensated module's output difference to the
  // reference formula on its input.
  std::vector<int32_t> toks = {0, 17, 250, 31, 999, 5, 77, 1023, 64};
  for (int T : {1, 9}) {
    std::vector<float> in_w, out_w, out_wo;
    std::span<const int32_t> s(toks.data(), size_t(T));
    auto grab = [&](std::vector<float>& in, std::vector<float>& out, Model& mm) {
      return TapFn([&, name = std::string("model.layers.0.self_attn.q_proj")](const std::string& n, TapPoint pt, const Tensor& t) {
        if (n != name) return;
        auto& dst = pt == TapPoint::Input ? in : out;
        dst.resize(size_t(t.rows * t.cols));
        mm.backend().download(t, dst.data());
      });
    };
    std::vector<float> in_wo;  // the plain model's input at the module (only its output is compared)
    TapFn t1 = grab(in_w, out_w, *with), t2 = grab(in_wo, out_wo, *without);
    auto c1 = with->make_kv_cache(1, 16), c2 = without->make_kv_cache(1, 16);
    with->forward(Batch::single(s, 0), *c1, LogitsMode::LastPerSeq, &t1);
    without->forward(Batch::single(s, 0), *c2, LogitsMode::LastPerSeq, &t2);
    std::vector<float> expect = out_wo;
    compensator_apply_reference(ecs[1], in_w.data(), T, expect.data());
    for (size_t i = 0; i < expect.size(); ++i) ASSERT_NEAR(out_w[i], expect[i], 1e-4) << "T=" << T << " i=" << i;
  }

  // Corrupt packages are refused with a clear message.
  fs::remove(fs::path(dir) / "compensators.safetensors");
  EXPECT_SPEAR_ERROR(Model::load(dir, be), "compensators.safetensors is missing");
  fs::remove_all(dir);
}

int run_cli(const std::string& args) {
  const std::string cmd = std::string("SPEAR_PROGRESS=0 ") + SPEAR_BINARY + " " + args + " > /dev/null 2>&1";
  return std::system(cmd.c_str());
}

TEST(Calibrate, SameSeedGivesIdenticalPackagesAndTrainingReducesTheKl) {
  // A small end-to-end run as users run it (the CLI): 4 model-sampled sequences of 64 tokens, RTN W4, 1%
  // budget, 6 training steps; twice, in two processes.
  const std::string a = test::scratch_dir("cal_a"), b = test::scratch_dir("cal_b");
  const std::string args = "calibrate --model " + test::ref_model_dir() +
                           " --calib-samples 4 --calib-len 64 --steps 6 --batch 2 --seed 3 --out ";
  ASSERT_EQ(run_cli(args + a), 0);
  ASSERT_EQ(run_cli(args + b), 0);
  EXPECT_EQ(test::read_file(a + "/compensators.safetensors"), test::read_file(b + "/compensators.safetensors"));
  EXPECT_EQ(test::read_file(a + "/model.safetensors"), test::read_file(b + "/model.safetensors"));
  EXPECT_EQ(test::read_file(a + "/manifest.json"), test::read_file(b + "/manifest.json"));
  nlohmann::json rep = nlohmann::json::parse(test::read_file(a + "/calibration_report.json"));
  EXPECT_LE(rep["compensator_fraction"].get<double>(), 0.01);
  EXPECT_GT(rep["compensator_fraction"].get<double>(), 0.009);
  EXPECT_LT(rep["stage2"]["final_loss"].get<double>(), rep["stage2"]["initial_loss"].get<double>());
  EXPECT_GT(rep["peak_rss_bytes"].get<double>(), 1e7);
  CpuBackend be;
  auto model = Model::load(a, be);
  EXPECT_EQ(model->compensated_modules().size(), rep["placement"]["modules"].size());

  // `spear eval` puts the full-precision model, the package's plain W4 base and the package in one table.
  const std::string text = test::scratch_dir("eval_text") + "/t.txt";
  {
    std::ofstream f(text);
    for (int i = 0; i < 40; ++i) f << "The little dog ran to the park and played with a red ball all day long. ";
  }
  const std::string eval_out = test::scratch_dir("eval_out") + "/e.json";
  ASSERT_EQ(std::system(("SPEAR_PROGRESS=0 " + std::string(SPEAR_BINARY) + " eval --model " + test::ref_model_dir() + " -p " + a +
                         " --data " + text + " --ctx 128 --windows 2 --json > " + eval_out + " 2>/dev/null").c_str()), 0);
  nlohmann::json ev = nlohmann::json::parse(test::read_file(eval_out));
  ASSERT_EQ(ev["rows"].size(), 3u);
  EXPECT_EQ(ev["rows"][0]["kind"], "fp");
  EXPECT_EQ(ev["rows"][1]["kind"], "base");
  EXPECT_EQ(ev["rows"][2]["kind"], "package");
  EXPECT_GT(ev["rows"][1]["kl"]["mean"].get<double>(), 0.0);
  EXPECT_TRUE(ev["rows"][2].contains("gap_closed_pct"));
  EXPECT_NEAR(ev["rows"][2]["ec_fraction"].get<double>(), rep["compensator_fraction"].get<double>(), 1e-9);

  // QERA-exact (closed form only) reduces each module's activation-weighted error ‖ΔW − BA‖_R.
  CalibrateOptions o;
  o.quant.calib_samples = 4;
  o.quant.calib_len = 64;
  o.stage1_samples = 4;
  o.quant.seed = 3;
  o.init = "qera";
  o.train.steps = 0;
  o.diagnosis_in = a + "/calibration_report.json";
  CalibrateResult r3 = calibrate(test::ref_model_dir(), b, o);
  ASSERT_FALSE(r3.report["stage1"].empty());
  for (const auto& m : r3.report["stage1"])
    EXPECT_LT(m["weighted_error_after"].get<double>(), 0.999 * m["weighted_error_before"].get<double>()) << m["module"];
  fs::remove_all(a);
  fs::remove_all(b);
}

}  // namespace
}  // namespace spear
