// spear make-model: random checkpoints load like real ones, have the real models' shapes and parameter
// counts, and are a deterministic function of the seed (not of threads or sharding).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <gtest/gtest.h>
#include <omp.h>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/random_model.h"
#include "quant/quantize_model.h"
#include "test_util.h"

namespace spear {

namespace fs = std::filesystem;

namespace {

ModelConfig tiny() { return find_model_preset("tiny").config; }

std::string make(const std::string& dir, uint64_t seed, size_t max_shard = 5'000'000'000) {
  RandomModelOptions o;
  o.seed = seed;
  o.like = "tiny";
  o.progress = false;
  o.max_shard_bytes = max_shard;
  write_random_model(tiny(), dir, o);
  return dir;
}

std::vector<float> logits_of(const std::string& dir, const std::vector<int32_t>& ids) {
  CpuBackend be;
  auto m = Model::load(dir, be);
  auto cache = m->make_kv_cache(1, int(ids.size()));
  return m->forward(Batch::single(ids, 0), *cache, LogitsMode::All);
}

const std::vector<int32_t> kIds = {1, 17, 300, 42, 511, 7, 7, 128};

// A scratch directory removed when the test ends (the random checkpoints need not outlive it).
struct Scratch {
  std::string path;
  explicit Scratch(const std::string& name) : path(test::scratch_dir(name)) {}
  ~Scratch() { fs::remove_all(path); }
};

}  // namespace

TEST(RandomModel, TinyLoadsWithConfigShapesAndFiniteLogits) {
  Scratch tmp("random_tiny");
  const std::string dir = make(tmp.path + "/m", 3);
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(dir + "/generation_config.json"));
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.json"));  // benchmarks feed token ids

  CpuBackend be;
  auto m = Model::load(dir, be);
  const ModelConfig& c = m->config();
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.intermediate_size, 256);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.dtype, DType::BF16);
  EXPECT_EQ(m->parameter_count(), parameter_count(tiny()));
  EXPECT_EQ(parameter_count(tiny()), 426624u);
  auto dims = m->linear_dims();
  EXPECT_EQ(dims.at("model.layers.1.self_attn.k_proj"), std::make_pair(64, 128));
  EXPECT_EQ(dims.at("model.layers.0.mlp.down_proj"), std::make_pair(128, 256));

  // The tensors on disk: bf16, N(0, 0.02²) weights, unit norms.
  Checkpoint ck(dir);
  EXPECT_EQ(ck.names().size(), 2u + 2 * 9 + 1);  // embed, lm_head, 9 per layer, final norm
  const TensorView& emb = ck.get("model.embed_tokens.weight");
  EXPECT_EQ(emb.dtype, DType::BF16);
  EXPECT_EQ(emb.shape, (std::vector<int64_t>{512, 128}));
  double s = 0, s2 = 0;
  for (float v : emb.to_f32()) s += v, s2 += double(v) * v;
  const double n = double(emb.numel()), mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 3e-4);
  EXPECT_NEAR(sd, 0.02, 0.02 * 0.02);
  for (float v : ck.get("model.layers.1.post_attention_layernorm.weight").to_f32()) ASSERT_EQ(v, 1.f);
  EXPECT_NE(ck.get("lm_head.weight").to_f32(), emb.to_f32());  // independent streams per tensor

  auto cache = m->make_kv_cache(1, int(kIds.size()));
  auto logits = m->forward(Batch::single(kIds, 0), *cache, LogitsMode::All);
  ASSERT_EQ(logits.size(), kIds.size() * 512);
  float lo = logits[0], hi = logits[0];
  for (float v : logits) {
    ASSERT_TRUE(std::isfinite(v));
    lo = std::min(lo, v), hi = std::max(hi, v);
  }
  EXPECT_GT(hi - lo, 1e-3f);  // not degenerate
}

TEST(RandomModel, SameSeedSameBytesOtherSeedOtherBytes) {
  Scratch tmp("random_seed");
  const std::string& root = tmp.path;
  make(root + "/a", 11);
  make(root + "/b", 11);
  make(root + "/c", 12);
  const std::string a = test::read_file(root + "/a/model.safetensors");
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(a, test::read_file(root + "/b/model.safetensors"));
  EXPECT_EQ(test::read_file(root + "/a/config.json"), test::read_file(root + "/b/config.json"));
  EXPECT_NE(a, test::read_file(root + "/c/model.safetensors"));
  EXPECT_EQ(a.size(), test::read_file(root + "/c/model.safetensors").size());
}

TEST(RandomModel, ShardedCheckpointHasTheSameWeights) {
  Scratch tmp("random_shards");
  const std::string& root = tmp.path;
  make(root + "/one", 5);
  make(root + "/many", 5, 200'000);  // ~0.85 MB of bf16 -> several shards
  EXPECT_TRUE(fs::exists(root + "/many/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(root + "/many/model.safetensors"));
  Checkpoint one(root + "/one"), many(root + "/many");
  EXPECT_GT(many.num_files(), 2u);
  EXPECT_EQ(one.names(), many.names());
  for (const auto& n : one.names()) EXPECT_EQ(one.get(n).to_f32(), many.get(n).to_f32()) << n;
  EXPECT_EQ(logits_of(root + "/one", kIds), logits_of(root + "/many", kIds));
}

TEST(RandomModel, GeneratorIndependentOfThreadsAndLength) {
  const uint64_t key = random_tensor_key(42, "model.layers.0.mlp.up_proj.weight");
  const size_t n = 100001;  // odd: the last element takes the first value of its pair
  std::vector<uint16_t> one(n), many(n), prefix(1001);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  fill_normal_bf16(one.data(), n, key, 0.02f);
  omp_set_num_threads(4);
  fill_normal_bf16(many.data(), n, key, 0.02f);
  omp_set_num_threads(saved);
  EXPECT_EQ(one, many);
  fill_normal_bf16(prefix.data(), prefix.size(), key, 0.02f);
  EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), one.begin()));
  EXPECT_NE(random_tensor_key(42, "a"), random_tensor_key(43, "a"));
  EXPECT_NE(random_tensor_key(42, "a"), random_tensor_key(42, "b"));
}

TEST(RandomModel, GeneratorIsStandardNormal) {
  const size_t n = 1 << 21;
  std::vector<uint16_t> v(n);
  fill_normal_bf16(v.data(), n, random_tensor_key(0, "stats"), 1.f);
  double s = 0, s2 = 0, s4 = 0;
  size_t over2 = 0, over3 = 0;
  for (uint16_t h : v) {
    const double z = bf16_to_f32(h);
    s += z, s2 += z * z, s4 += z * z * z * z;
    over2 += std::fabs(z) > 2, over3 += std::fabs(z) > 3;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 4.0 / std::sqrt(double(n)));
  EXPECT_NEAR(var, 1.0, 0.01);
  EXPECT_NEAR(s4 / n, 3.0, 0.05);                   // normal kurtosis
  EXPECT_NEAR(double(over2) / n, 0.0455, 0.0015);   // P(|z| > 2)
  EXPECT_NEAR(double(over3) / n, 0.0027, 0.0003);   // P(|z| > 3)
}

TEST(RandomModel, RefusesNonEmptyOutput) {
  Scratch tmp("random_refuse");
  const std::string& dir = tmp.path;
  std::ofstream(dir + "/keep.txt") << "x";
  RandomModelOptions o;
  o.progress = false;
  EXPECT_SPEAR_ERROR(write_random_model(tiny(), dir, o), "not empty");
  EXPECT_EQ(test::read_file(dir + "/keep.txt"), "x");
  EXPECT_SPEAR_ERROR(find_model_preset("llama-9"), "llama-3.1-8b");
}

TEST(RandomModel, LayerOverrideAndTiedEmbeddingsLoad) {
  ModelConfig c = tiny();
  c.num_layers = 1;
  c.sliding_window.assign(1, 0);
  c.tie_word_embeddings = true;  // as the Llama 3.2 presets: no lm_head.weight on disk
  Scratch tmp("random_layers");
  const std::string dir = tmp.path + "/m";
  RandomModelOptions o;
  o.progress = false;
  write_random_model(c, dir, o);
  EXPECT_FALSE(Checkpoint(dir).has("lm_head.weight"));
  CpuBackend be;
  auto m = Model::load(dir, be);
  EXPECT_EQ(m->config().num_layers, 1);
  EXPECT_TRUE(m->config().tie_word_embeddings);
  EXPECT_EQ(m->parameter_count(), parameter_count(c));
  EXPECT_EQ(parameter_count(c), 213376u);  // 512·128 embedding + final norm 128 + one layer 147712
}

// decodable_vocab (make-model --tokenizer): the output rows beyond it are zero and the rest unchanged, tied
// (embedding) or not (lm_head); greedy outputs then stay below it; out-of-range values are refused.
TEST(RandomModel, DecodableVocabZeroesOutputRowsBeyondIt) {
  Scratch tmp("random_decodable");
  make(tmp.path + "/plain", 3);
  for (bool tied : {false, true}) {
    ModelConfig c = tiny();
    c.tie_word_embeddings = tied;
    const std::string dir = tmp.path + (tied ? "/tied" : "/untied");
    RandomModelOptions o;
    o.seed = 3;
    o.progress = false;
    o.decodable_vocab = 100;
    write_random_model(c, dir, o);
    const std::string out_name = tied ? "model.embed_tokens.weight" : "lm_head.weight";
    const std::vector<float> w = Checkpoint(dir).get(out_name).to_f32();
    const std::vector<float> ref = Checkpoint(tmp.path + "/plain").get(out_name).to_f32();
    const size_t H = size_t(c.hidden_size);
    ASSERT_EQ(w.size(), size_t(c.vocab_size) * H);
    EXPECT_TRUE(std::equal(w.begin(), w.begin() + 100 * H, ref.begin())) << out_name << ": rows < 100 changed";
    EXPECT_TRUE(std::all_of(w.begin() + 100 * H, w.end(), [](float v) { return v == 0.f; })) << out_name;
    const std::vector<float> logits = logits_of(dir, kIds);
    const size_t V = size_t(c.vocab_size);
    for (size_t t = 0; t < kIds.size(); ++t) {
      const auto row = logits.begin() + long(t * V);
      EXPECT_LT(std::max_element(row, row + long(V)) - row, 100) << "token " << t << (tied ? " tied" : "");
    }
  }
  RandomModelOptions bad;
  bad.progress = false;
  bad.decodable_vocab = tiny().vocab_size + 1;
  EXPECT_THROW(write_random_model(tiny(), tmp.path + "/bad", bad), Error);
}

// --quantize-out: the random checkpoint goes through the ordinary RTN path into a package that loads.
TEST(RandomModel, QuantizedPackageOfRandomModelLoads) {
  Scratch tmp("random_quant");
  const std::string dir = make(tmp.path + "/m", 9), pkg = tmp.path + "/q";
  QuantizeOptions q;
  q.params.bits = 4;
  q.params.group_size = 32;
  QuantizeResult r = quantize_model(dir, pkg, q);
  EXPECT_EQ(r.manifest.quantized_modules.size(), 2u * 7);
  EXPECT_TRUE(is_package(pkg));
  CpuBackend be;
  auto m = Model::load(pkg, be);
  ASSERT_TRUE(m->package().has_value());
  EXPECT_EQ(m->package()->params.group_size, 32);
  auto cache = m->make_kv_cache(1, int(kIds.size()));
  auto quant = m->forward(Batch::single(kIds, 0), *cache, LogitsMode::All);
  const auto dense = logits_of(dir, kIds);
  ASSERT_EQ(quant.size(), dense.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < quant.size(); ++i) {
    ASSERT_TRUE(std::isfinite(quant[i]));
    num += (quant[i] - dense[i]) * double(quant[i] - dense[i]), den += double(dense[i]) * dense[i];
  }
  EXPECT_LT(std::sqrt(num / den), 0.3);  // W4 g32 of N(0, 0.02²) weights: close to the bf16 model, not equal
  EXPECT_GT(num, 0.0);
}

// The presets' config.json parse back through the loader to the same shapes, with the real parameter counts.
TEST(RandomModel, PresetConfigsAndParameterCounts) {
  const std::map<std::string, size_t> expected = {{"tiny", 426'624},
                                                  {"llama-3.2-1b", 1'235'814'400},
                                                  {"llama-3.2-3b", 3'212'749'824},
                                                  {"llama-3.1-8b", 8'030'261'248},
                                                  {"llama-2-13b", 13'015'864'320}};
  ASSERT_EQ(model_presets().size(), expected.size());
  for (const ModelPreset& p : model_presets()) {
    SCOPED_TRACE(p.name);
    const ModelConfig c = parse_model_config(llama_config_json(p.config), p.name, supported_architectures());
    EXPECT_EQ(c.vocab_size, p.config.vocab_size);
    EXPECT_EQ(c.hidden_size, p.config.hidden_size);
    EXPECT_EQ(c.intermediate_size, p.config.intermediate_size);
    EXPECT_EQ(c.num_layers, p.config.num_layers);
    EXPECT_EQ(c.num_heads, p.config.num_heads);
    EXPECT_EQ(c.num_kv_heads, p.config.num_kv_heads);
    EXPECT_EQ(c.head_dim, p.config.head_dim);
    EXPECT_EQ(c.max_position_embeddings, p.config.max_position_embeddings);
    EXPECT_EQ(c.tie_word_embeddings, p.config.tie_word_embeddings);
    EXPECT_EQ(c.rope.type, p.config.rope.type);
    EXPECT_DOUBLE_EQ(c.rope.theta, p.config.rope.theta);
    EXPECT_DOUBLE_EQ(c.rope.factor, p.config.rope.factor);
    EXPECT_EQ(c.rope.original_max_position, p.config.rope.original_max_position);
    EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
    EXPECT_EQ(c.dtype, DType::BF16);
    EXPECT_EQ(c.bos_token_ids, p.config.bos_token_ids);
    EXPECT_EQ(c.eos_token_ids, p.config.eos_token_ids);
    EXPECT_EQ(parameter_count(c), expected.at(p.name));
  }
  const ModelConfig l1 = find_model_preset("llama-3.2-1b").config;
  EXPECT_EQ(l1.hidden_size, 2048);
  EXPECT_EQ(l1.head_dim, 64);
  EXPECT_TRUE(l1.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(l1.rope.theta, 500000.0);
  EXPECT_EQ(l1.max_position_embeddings, 131072);
  const ModelConfig l8 = find_model_preset("llama-3.1-8b").config;
  EXPECT_FALSE(l8.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(l8.rope.factor, 8.0);
  const ModelConfig l13 = find_model_preset("llama-2-13b").config;
  EXPECT_EQ(l13.rope.type, "default");
  EXPECT_DOUBLE_EQ(l13.rope.theta, 10000.0);
  EXPECT_EQ(l13.num_kv_heads, 40);
  EXPECT_EQ(l13.max_position_embeddings, 4096);
  EXPECT_TRUE(llama_config_json(l13)["rope_scaling"].is_null());
}

}  // namespace spear
