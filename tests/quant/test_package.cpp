// Quantized packages: RTN matches reference.json's definition, packages load and reproduce the reference
// W4 perplexity, writing is deterministic, and corrupt packages are refused with clear errors.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "eval/perplexity.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/package.h"
#include "quant/quantize_model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace spear {
namespace fs = std::filesystem;

namespace {

std::string rtn_package(const std::string& name, QuantParams p = {}) {
  std::string out = test::scratch_dir(name);
  QuantizeOptions o;
  o.method = "rtn";
  o.params = p;
  quantize_model(test::ref_model_dir(), out, o);
  return out;
}
}  // namespace

TEST(Rtn, MatchesReferenceDefinitionOnRealRows) {
  // reference.json: scale=(mx-mn)/15, zero=round(-mn/scale), q=clamp(round(w/scale)+zero,0,15), w'=(q-zero)*scale
  Checkpoint ck(test::ref_model_dir());
  std::vector<float> w = ck.get("model.layers.2.mlp.down_proj.weight").to_f32();
  const int out = 512, in = 1536;
  QuantizedMatrix q = rtn_quantize(w.data(), out, in, QuantParams{});
  for (int r = 0; r < out; r += 37) {
    const float* row = w.data() + size_t(r) * in;
    float mn = row[0], mx = row[0];
    for (int c = 0; c < in; ++c) mn = std::min(mn, row[c]), mx = std::max(mx, row[c]);
    float scale = (mx - mn) / 15.f;
    float zero = std::nearbyint(-mn / scale);
    for (int c = 0; c < in; ++c) {
      float qq = std::clamp(std::nearbyint(row[c] / scale) + zero, 0.f, 15.f);
      ASSERT_EQ(q.dequant(r, c), (qq - zero) * scale) << r << "," << c;
    }
  }
}

TEST(Package, RtnW4PerplexityMatchesReference) {
  SPEAR_REQUIRE_SHARED();
  std::string pkg = rtn_package("pkg_rtn4");
  auto ref = nlohmann::json::parse(test::read_file(test::ref_model_dir() + "/reference.json"));
  CpuBackend be;
  auto model = Model::load(pkg, be);
  ASSERT_TRUE(model->package().has_value());
  EXPECT_EQ(model->package()->quantized_modules.size(), 42u);
  Tokenizer tok = Tokenizer::from_dir(pkg);
  for (const char* split : {"test.txt"}) {
    std::vector<int32_t> ids = tok.encode(test::read_file(test::shared_dir() + "/data/" + split), false);
    PerplexityResult r = perplexity(*model, ids, 512);
    const double want = ref[split]["ppl_rtn_w4_per_channel_asym"].get<double>();
    EXPECT_NEAR(r.ppl, want, want * 5e-4) << split;
    std::printf("RTN W4 per-channel %s: ppl %.4f (reference %.4f, rel. diff %.2e)\n", split, r.ppl, want,
                (r.ppl - want) / want);
  }
}

TEST(Package, DeterministicAndSmall) {
  QuantParams g128;
  g128.group_size = 128;
  std::string a = rtn_package("pkg_det_a", g128), b = rtn_package("pkg_det_b", g128);
  EXPECT_EQ(test::read_file(a + "/model.safetensors"), test::read_file(b + "/model.safetensors"));
  EXPECT_EQ(test::read_file(a + "/manifest.json"), test::read_file(b + "/manifest.json"));
  // 4-bit codes for 18.9M weights + fp32 scales and u8 zeros per 128 + bf16 embeddings and norms.
  const size_t bytes = fs::file_size(a + "/model.safetensors");
  EXPECT_LT(bytes, 20'000'000u);
  EXPECT_GT(bytes, 17'000'000u);
}

TEST(Package, QuantizedForwardEqualsDequantizedWeights) {
  // A package's forward pass equals the fp32 model with the dequantized weights (same function).
  QuantParams p;
  p.group_size = 64;
  std::string pkg = test::scratch_dir("pkg_qwen");
  QuantizeOptions o;
  o.params = p;
  quantize_model(test::fixture_dir("models/qwen2-tiny"), pkg, o);
  CpuBackend be;
  auto qm = Model::load(pkg, be);
  auto fm = Model::load(test::fixture_dir("models/qwen2-tiny"), be);
  Checkpoint ck(test::fixture_dir("models/qwen2-tiny"));
  for (int li = 0; li < fm->config().num_layers; ++li) {
    auto& L = fm->layers()[size_t(li)];
    for (Linear* l : L.linears()) {
      auto* d = dynamic_cast<CpuDenseLinear*>(l);
      ASSERT_NE(d, nullptr);
      d->w = rtn_quantize(d->w.data(), d->out_features, d->in_features, p).dequantize();
    }
  }
  std::vector<int32_t> ids = {5, 77, 300, 12, 9, 410, 33, 2, 98, 150, 7, 61};
  auto c1 = qm->make_kv_cache(1, 16), c2 = fm->make_kv_cache(1, 16);
  auto a = qm->forward(Batch::single(ids, 0), *c1, LogitsMode::All);
  auto b = fm->forward(Batch::single(ids, 0), *c2, LogitsMode::All);
  float md = 0;
  for (size_t i = 0; i < a.size(); ++i) md = std::max(md, std::fabs(a[i] - b[i]));
  EXPECT_LT(md, 1e-3f);
}

TEST(Gptq, PackageIsDeterministicPerSeed) {
  auto make = [](const std::string& name, uint64_t seed) {
    std::string out = test::scratch_dir(name);
    QuantizeOptions o;
    o.method = "gptq";
    o.params.group_size = 32;
    o.calib_samples = 6;
    o.calib_len = 24;
    o.chunk_sequences = 4;
    o.seed = seed;
    QuantizeResult r = quantize_model(test::fixture_dir("models/qwen2-tiny"), out, o);
    EXPECT_EQ(r.manifest.calibration_source, "model-samples");
    return out;
  };
  std::string a = make("gptq_a", 3), b = make("gptq_b", 3), c = make("gptq_c", 4);
  EXPECT_EQ(test::read_file(a + "/model.safetensors"), test::read_file(b + "/model.safetensors"));
  EXPECT_EQ(test::read_file(a + "/manifest.json"), test::read_file(b + "/manifest.json"));
  EXPECT_NE(read_manifest(a).data_hash, read_manifest(c).data_hash);
  EXPECT_NE(test::read_file(a + "/model.safetensors"), test::read_file(c + "/model.safetensors"));
}

TEST(Gptq, BeatsRtnOnTheReferenceModel) {
  // Small but real: 16 calibration windows of calib.txt, perplexity on the first 12 windows of valid.txt.
  SPEAR_REQUIRE_SHARED();
  QuantizeOptions g;
  g.method = "gptq";
  g.calib_file = test::shared_dir() + "/data/calib.txt";
  g.calib_samples = 16;
  g.calib_len = 512;
  std::string gp = test::scratch_dir("gptq_ref"), rp = rtn_package("rtn_ref");
  quantize_model(test::ref_model_dir(), gp, g);
  Tokenizer tok = Tokenizer::from_dir(test::ref_model_dir());
  std::vector<int32_t> ids = tok.encode(test::read_file(test::shared_dir() + "/data/valid.txt"), false);
  CpuBackend be;
  double fp = perplexity(*Model::load(test::ref_model_dir(), be), ids, 512, 12).ppl;
  double rtn = perplexity(*Model::load(rp, be), ids, 512, 12).ppl;
  double gptq = perplexity(*Model::load(gp, be), ids, 512, 12).ppl;
  std::printf("valid.txt, 12 windows: fp32 %.3f  RTN W4 %.3f  GPTQ W4 %.3f (gap closed %.0f%%)\n", fp, rtn, gptq,
              100 * (rtn - gptq) / (rtn - fp));
  EXPECT_LT(gptq, rtn - 0.2 * (rtn - fp));  // closes at least a fifth of the gap
  EXPECT_GT(gptq, fp);
}

class CorruptPackage : public ::testing::Test {
 protected:
  void SetUp() override { pkg_ = rtn_package("pkg_corrupt_src"); }
  std::string copy(const std::string& name) {
    std::string d = test::scratch_dir(name);
    for (const auto& e : fs::directory_iterator(pkg_)) fs::copy(e.path(), d + "/" + e.path().filename().string());
    return d;
  }
  // Rewrites model.safetensors with `edit` applied to the tensor list.
  void rewrite(const std::string& d, const std::function<void(std::vector<TensorToWrite>&)>& edit) {
    std::vector<uint8_t> keep;
    {
      std::ifstream in(d + "/model.safetensors", std::ios::binary);
      keep.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    std::string tmp = d + "/orig.safetensors";
    std::ofstream(tmp, std::ios::binary).write(reinterpret_cast<const char*>(keep.data()), std::streamsize(keep.size()));
    SafetensorsFile f(tmp);
    std::vector<TensorToWrite> ts;
    for (const auto& [n, t] : f.tensors()) ts.push_back({n, t.dtype, t.shape, t.data, t.nbytes});
    edit(ts);
    write_safetensors(d + "/model.safetensors", ts);
    fs::remove(tmp);
  }
  std::string pkg_;
};

TEST_F(CorruptPackage, MissingScales) {
  std::string d = copy("pkg_noscales");
  rewrite(d, [](auto& ts) {
    std::erase_if(ts, [](const TensorToWrite& t) { return t.name == "model.layers.1.mlp.up_proj.scales"; });
  });
  CpuBackend be;
  EXPECT_SPEAR_ERROR(Model::load(d, be), "missing 'model.layers.1.mlp.up_proj.scales'");
}

TEST_F(CorruptPackage, WrongShape) {
  std::string d = copy("pkg_shape");
  std::vector<uint8_t> z(512 * 2, 0);
  rewrite(d, [&](auto& ts) {
    for (auto& t : ts)
      if (t.name == "model.layers.0.self_attn.q_proj.zeros") t = {t.name, DType::U8, {512, 2}, z.data(), z.size()};
  });
  CpuBackend be;
  EXPECT_SPEAR_ERROR(Model::load(d, be), "'model.layers.0.self_attn.q_proj.zeros' is U8 [512, 2], expected U8 [512, 1]");
}

TEST_F(CorruptPackage, ZeroPointOutOfRange) {
  std::string d = copy("pkg_zero");
  std::vector<uint8_t> z(512, 200);
  rewrite(d, [&](auto& ts) {
    for (auto& t : ts)
      if (t.name == "model.layers.0.self_attn.q_proj.zeros") t.data = z.data();
  });
  CpuBackend be;
  EXPECT_SPEAR_ERROR(Model::load(d, be), "zero point 200 > 15");
}

TEST_F(CorruptPackage, ManifestProblems) {
  CpuBackend be;
  std::string d = copy("pkg_manifest");
  auto j = nlohmann::json::parse(test::read_file(d + "/manifest.json"));
  j["format_version"] = 99;
  std::ofstream(d + "/manifest.json") << j.dump();
  EXPECT_SPEAR_ERROR(Model::load(d, be), "package format version 99 is not supported");
  j["format_version"] = 1;
  j["quantization"]["bits"] = 3;
  j["quantization"].erase("group_size");
  std::ofstream(d + "/manifest.json") << j.dump();
  EXPECT_SPEAR_ERROR(Model::load(d, be), "missing 'quantization.group_size'");
  std::ofstream(d + "/manifest.json") << "{not json";
  EXPECT_SPEAR_ERROR(Model::load(d, be), "invalid JSON");
  std::ofstream(d + "/manifest.json") << R"({"format":"other"})";
  EXPECT_SPEAR_ERROR(Model::load(d, be), "not a SPEAR package");
}

TEST_F(CorruptPackage, TruncatedWeights) {
  std::string d = copy("pkg_trunc");
  fs::resize_file(d + "/model.safetensors", fs::file_size(d + "/model.safetensors") / 2);
  CpuBackend be;
  EXPECT_THROW(Model::load(d, be), Error);
}

}  // namespace spear
