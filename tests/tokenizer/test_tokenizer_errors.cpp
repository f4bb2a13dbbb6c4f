// Malformed tokenizer files raise spear::Error naming the file and the field; nothing crashes.
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;
using spear::Tokenizer;

namespace {

const std::string kGpt2 = std::string(SPEAR_SOURCE_DIR) + "/tests/fixtures/tokenizers/gpt2";

class TokenizerErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("spear_tok_err_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
            "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ifstream f(kGpt2 + "/tokenizer.json");
    base_ = json::parse(f);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& content) {
    const auto p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  // Loads base_ after `edit`, expecting an error whose message contains `needle` and the path.
  void expect_error(const std::function<void(json&)>& edit, const std::string& needle) {
    json j = base_;
    edit(j);
    const auto p = write("tokenizer.json", j.dump());
    try {
      Tokenizer::from_json_file(p);
      ADD_FAILURE() << "no error, expected: " << needle;
    } catch (const spear::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
    }
  }

  fs::path dir_;
  json base_;
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const spear::Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_F(TokenizerErrors, BaseLoads) {
  const auto p = write("tokenizer.json", base_.dump());
  EXPECT_GT(Tokenizer::from_json_file(p).vocab_size(), 256);
}

TEST_F(TokenizerErrors, MissingFile) {
  const auto msg = error_of([&] { Tokenizer::from_json_file((dir_ / "nope.json").string()); });
  EXPECT_NE(msg.find("nope.json: cannot open"), std::string::npos) << msg;
  const auto msg2 = error_of([&] { Tokenizer::from_dir((dir_ / "missing_dir").string()); });
  EXPECT_NE(msg2.find("tokenizer.json: cannot open"), std::string::npos) << msg2;
}

TEST_F(TokenizerErrors, NotJson) {
  const auto p = write("tokenizer.json", "{\"model\": [1, 2,,");
  const auto msg = error_of([&] { Tokenizer::from_json_file(p); });
  EXPECT_NE(msg.find(p + ": invalid JSON"), std::string::npos) << msg;
  const auto empty = write("empty.json", "");
  EXPECT_NE(error_of([&] { Tokenizer::from_json_file(empty); }).find("invalid JSON"),
            std::string::npos);
  const auto arr = write("arr.json", "[1, 2]");
  EXPECT_NE(error_of([&] { Tokenizer::from_json_file(arr); }).find("must be a JSON object"),
            std::string::npos);
}

TEST_F(TokenizerErrors, MissingModelOrVocab) {
  expect_error([](json& j) { j.erase("model"); }, "missing \"model\"");
  expect_error([](json& j) { j["model"].erase("vocab"); }, "model.vocab: missing");
  expect_error([](json& j) { j["model"]["vocab"] = json::array(); }, "model.vocab: missing or not an object");
  expect_error([](json& j) { j["model"].erase("merges"); }, "model.merges: missing");
  expect_error([](json& j) { j["model"]["vocab"]["Ġzz"] = "seven"; }, "vocab[\"Ġzz\"]: id must be");
  expect_error([](json& j) { j["model"]["type"] = "WordPiece"; }, "unsupported model type 'WordPiece'");
  expect_error([](json& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback is not supported");
}

TEST_F(TokenizerErrors, MergesWithUnknownTokens) {
  expect_error([](json& j) { j["model"]["merges"].push_back("Ġqqq zzz"); },
               "token 'Ġqqq' is not in the vocab");
  expect_error([](json& j) { j["model"]["merges"][0] = "nospace"; }, "merges[0]: 'nospace' is not of the form");
  expect_error([](json& j) { j["model"]["merges"][1] = 42; }, "merges[1]: expected");
  // Both parts known but their concatenation is not a token.
  expect_error([](json& j) { j["model"]["merges"].push_back("Q X"); }, "token 'QX' is not in the vocab");
}

TEST_F(TokenizerErrors, UnsupportedComponents) {
  expect_error([](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}}; },
               "unsupported pre_tokenizer type 'Metaspace'");
  expect_error([](json& j) { j["pre_tokenizer"] = nullptr; }, "pre_tokenizer must end with ByteLevel");
  expect_error([](json& j) { j["pre_tokenizer"] = {{"type", "Sequence"}}; }, "\"pretokenizers\" array");
  expect_error(
      [](json& j) {
        j["pre_tokenizer"] = {{"type", "Sequence"},
                              {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}},
                                                  {"behavior", "Removed"}, {"invert", false}},
                                                 {{"type", "ByteLevel"}, {"use_regex", false}}}}};
      },
      "unsupported Split behavior 'Removed'");
  expect_error(
      [](json& j) {
        j["pre_tokenizer"] = {{"type", "Sequence"},
                              {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}},
                                                  {"behavior", "Isolated"}, {"invert", false}},
                                                 {{"type", "ByteLevel"}, {"use_regex", false}}}}};
      },
      "cannot compile regex '(unclosed'");
  expect_error([](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; },
               "unsupported normalizer type 'Lowercase'");
  expect_error([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder must be ByteLevel");
  expect_error([](json& j) { j["post_processor"] = {{"type", "Fancy"}}; },
               "unsupported post_processor type 'Fancy'");
  expect_error(
      [](json& j) {
        j["post_processor"] = {{"type", "TemplateProcessing"},
                               {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                               {"special_tokens", json::object()}};
      },
      "special token '<s>' is not in special_tokens");
  // A field of the wrong JSON type is reported, not thrown as a raw nlohmann exception.
  expect_error([](json& j) { j["pre_tokenizer"]["add_prefix_space"] = "yes"; }, "malformed tokenizer");
  expect_error([](json& j) { j["added_tokens"] = {{{"content", "<x>"}}}; }, "added_tokens[0]");
}

TEST_F(TokenizerErrors, BadSideConfigNamesFile) {
  fs::copy_file(kGpt2 + "/tokenizer.json", dir_ / "tokenizer.json");
  write("tokenizer_config.json", "{not json");
  auto msg = error_of([&] { Tokenizer::from_dir(dir_.string()); });
  EXPECT_NE(msg.find("tokenizer_config.json: invalid JSON"), std::string::npos) << msg;
  write("tokenizer_config.json", R"({"bos_token": 5})");
  msg = error_of([&] { Tokenizer::from_dir(dir_.string()); });
  EXPECT_NE(msg.find("tokenizer_config.json: bos_token must be"), std::string::npos) << msg;
  write("tokenizer_config.json", R"({"eos_token": {"content": "<|endoftext|>"}})");
  write("config.json", R"({"eos_token_id": "x"})");
  // config.json is only consulted when nothing else names an EOS.
  EXPECT_EQ(Tokenizer::from_dir(dir_.string()).eos_ids(), std::vector<int32_t>{0});
  write("tokenizer_config.json", "{}");
  msg = error_of([&] { Tokenizer::from_dir(dir_.string()); });
  EXPECT_NE(msg.find("config.json: eos_token_id"), std::string::npos) << msg;
}
