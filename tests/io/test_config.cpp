// config.json parsing across architectures and transformers versions, and its clear refusals.
#include <cmath>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/model.h"
#include "test_util.h"

namespace spear {
using nlohmann::json;

namespace {
json base_llama() {
  return json::parse(R"({"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":64,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
    "rms_norm_eps":1e-5,"rope_theta":10000.0})");
}
ModelConfig parse(const json& j) { return parse_model_config(j, "config.json", supported_architectures()); }
}  // namespace

TEST(Config, ReferenceModel) {
  ModelConfig c = load_config(test::ref_model_dir());
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 512);
  EXPECT_EQ(c.num_layers, 6);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 1536);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);  // from rope_parameters
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.dtype, DType::BF16);
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{1});
}

TEST(Config, Architectures) {
  ModelConfig q = load_config(test::fixture_dir("models/qwen2-tiny"));
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_EQ(q.sliding_window, (std::vector<int>{0, 8, 8}));  // layer_types
  EXPECT_DOUBLE_EQ(q.rope.theta, 1e6);
  ModelConfig m = load_config(test::fixture_dir("models/mistral-tiny"));
  EXPECT_EQ(m.head_dim, 32);  // explicit, != hidden / heads
  EXPECT_EQ(m.sliding_window, (std::vector<int>{8, 8}));
  EXPECT_DOUBLE_EQ(m.rope.theta, 1e4);  // old top-level spelling
  EXPECT_EQ(m.dtype, DType::BF16);      // old torch_dtype spelling
  ModelConfig l = load_config(test::fixture_dir("models/llama3-scaled-tiny"));
  EXPECT_EQ(l.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(l.rope.factor, 8.0);
  EXPECT_EQ(l.rope.original_max_position, 16);
  EXPECT_TRUE(l.qkv_bias && l.o_bias);
}

TEST(Config, DerivedHeadDimAndOldRopeScaling) {
  json j = base_llama();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  j["rope_theta"] = 500000.0;
  ModelConfig c = parse(j);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
}

TEST(Config, Llama3RopeTable) {
  RopeConfig r;
  r.type = "llama3";
  r.theta = 500000;
  r.factor = 32;
  r.low_freq_factor = 1;
  r.high_freq_factor = 4;
  r.original_max_position = 8192;
  RopeTable t = make_rope_table(r, 64, DType::F32);
  RopeConfig d = r;
  d.type = "default";
  RopeTable plain = make_rope_table(d, 64, DType::F32);
  // Short wavelengths (< 8192/4) untouched, long ones (> 8192) divided by the factor, medium blended.
  EXPECT_FLOAT_EQ(t.inv_freq[0], plain.inv_freq[0]);
  EXPECT_FLOAT_EQ(t.inv_freq[31], plain.inv_freq[31] / 32.f);
  for (int i = 0; i < 32; ++i) {
    EXPECT_LE(t.inv_freq[i], plain.inv_freq[i] * 1.0000001f);
    EXPECT_GE(t.inv_freq[i], plain.inv_freq[i] / 32.f * 0.9999999f);
  }
  RopeTable rounded = make_rope_table(d, 64, DType::BF16);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(rounded.inv_freq[i], bf16_to_f32(f32_to_bf16(plain.inv_freq[i])));
}

TEST(ConfigBad, Refusals) {
  struct Case {
    std::function<void(json&)> edit;
    const char* expect;
  } cases[] = {
      {[](json& j) { j["architectures"] = {"GPT2LMHeadModel"}; }, "architecture 'GPT2LMHeadModel' is not supported"},
      {[](json& j) { j.erase("architectures"); }, "missing 'architectures'"},
      {[](json& j) { j.erase("hidden_size"); }, "missing required field 'hidden_size'"},
      {[](json& j) { j["hidden_size"] = "big"; }, "'hidden_size' has the wrong type"},
      {[](json& j) { j["num_key_value_heads"] = 3; }, "not a multiple of num_key_value_heads"},
      {[](json& j) { j["hidden_act"] = "gelu"; }, "hidden_act 'gelu' is not supported"},
      {[](json& j) { j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; }, "RoPE scaling type 'yarn'"},
      {[](json& j) { j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 4.0}}; }, "low_freq_factor"},
      {[](json& j) { j["dtype"] = "float8"; }, "dtype 'float8' is not supported"},
      {[](json& j) { j["num_attention_heads"] = 5; j["num_key_value_heads"] = 5; }, "not divisible"},
      {[](json& j) { j["architectures"] = {"MistralForCausalLM"}; j["sliding_window"] = -1; }, "sliding_window"},
  };
  for (auto& c : cases) {
    json j = base_llama();
    c.edit(j);
    EXPECT_SPEAR_ERROR(parse(j), c.expect);
  }
  EXPECT_SPEAR_ERROR(load_config("/nonexistent"), "no config.json");
}

}  // namespace spear
