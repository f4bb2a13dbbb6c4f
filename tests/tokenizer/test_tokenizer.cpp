// Tokenizer equality with Hugging Face `tokenizers`: the reference model's golden ids and the
// fixtures built by tools/make_tokenizer_vectors.py with the real library.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;
using spear::Tokenizer;

namespace {

const std::string kRefModel = std::string(SPEAR_SOURCE_DIR) + "/models/ref-llama-23m";
const std::string kFixtures = std::string(SPEAR_SOURCE_DIR) + "/tests/fixtures/tokenizers";

json load_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return json::parse(f);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<int32_t> ids_of(const json& j) { return j.get<std::vector<int32_t>>(); }

}  // namespace

TEST(TokenizerRef, GoldenTokenizerEntries) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  const json golden = load_json(kRefModel + "/golden.json");
  ASSERT_GE(golden["tokenizer"].size(), 5u);
  for (const auto& e : golden["tokenizer"]) {
    const std::string text = e["text"];
    const auto want = ids_of(e["ids"]);
    EXPECT_EQ(tok.encode(text), want) << "text: " << text;
    EXPECT_EQ(tok.decode(want, /*skip_special=*/true), text);
    // Without add_special the BOS is not added and nothing else changes.
    EXPECT_EQ(tok.encode(text, false), std::vector<int32_t>(want.begin() + 1, want.end()));
  }
}

TEST(TokenizerRef, GoldenPromptAndGreedy) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  const json golden = load_json(kRefModel + "/golden.json");
  const auto ids = tok.encode(golden["prompt"].get<std::string>());
  const auto want = ids_of(golden["ids"]);
  ASSERT_GE(ids.size(), want.size());
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + want.size()), want);
  EXPECT_EQ(tok.decode(ids, true), golden["prompt"].get<std::string>());

  const auto g = tok.encode(golden["greedy"]["prompt"].get<std::string>());
  EXPECT_EQ(g, (std::vector<int32_t>{0, 492, 3019, 293}));
  const auto greedy_ids = ids_of(golden["greedy"]["ids"]);
  EXPECT_EQ(std::vector<int32_t>(greedy_ids.begin(), greedy_ids.begin() + g.size()), g);
  EXPECT_EQ(tok.decode(greedy_ids, true), golden["greedy"]["text"].get<std::string>());
}

TEST(TokenizerRef, SpecialIdsAndVocab) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  EXPECT_EQ(tok.vocab_size(), 8192);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{1});
  EXPECT_TRUE(tok.add_bos());
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_TRUE(tok.is_special(1));
  EXPECT_FALSE(tok.is_special(492));
  EXPECT_EQ(tok.token_to_id("<|begin_of_text|>"), 0);
  EXPECT_EQ(tok.token_to_id("Ġthe"), tok.encode(" the", false).at(0));
  EXPECT_FALSE(tok.token_to_id("definitely not a token").has_value());
  EXPECT_EQ(tok.token_bytes(0), "<|begin_of_text|>");
  EXPECT_EQ(tok.token_bytes(*tok.token_to_id("Ġthe")), " the");
  EXPECT_THROW(tok.token_bytes(8192), spear::Error);
  EXPECT_THROW(tok.token_bytes(-1), spear::Error);
  // Special tokens written in the text are recognised; skip_special drops them on decode.
  const auto ids = tok.encode("a<|end_of_text|>b", false);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], 1);
  EXPECT_EQ(tok.decode(ids), "a<|end_of_text|>b");
  EXPECT_EQ(tok.decode(ids, true), "ab");
  // Ids outside the vocabulary decode to nothing, like HF.
  const std::vector<int32_t> bad = {ids[0], 99999, -3};
  EXPECT_EQ(tok.decode(bad), "a");
  // from_json_file: BOS from the template, no EOS config.
  const Tokenizer bare = Tokenizer::from_json_file(kRefModel + "/tokenizer.json");
  EXPECT_EQ(bare.bos_id(), 0);
  EXPECT_TRUE(bare.eos_ids().empty());
  EXPECT_EQ(bare.encode("Hello world"), tok.encode("Hello world"));
}

class TokenizerFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerFixture, MatchesHuggingFaceVectors) {
  const std::string dir = kFixtures + "/" + GetParam();
  const Tokenizer tok = Tokenizer::from_dir(dir);
  const json vectors = load_json(dir + "/vectors.json")["vectors"];
  ASSERT_GE(vectors.size(), 50u);
  size_t checked = 0;
  for (const auto& v : vectors) {
    const std::string text = v["text"];
    const auto ids = ids_of(v["ids"]);
    EXPECT_EQ(tok.encode(text, true), ids) << GetParam() << " text: " << json(text).dump();
    EXPECT_EQ(tok.encode(text, false), ids_of(v["ids_plain"]))
        << GetParam() << " text: " << json(text).dump();
    // spear_decoded marks where SPEAR deliberately differs (non-ASCII added tokens).
    const std::string decoded = v.value("spear_decoded", v["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(ids), decoded)
        << GetParam() << " text: " << json(text).dump();
    ++checked;
  }
  EXPECT_EQ(checked, vectors.size());
}

INSTANTIATE_TEST_SUITE_P(HF, TokenizerFixture, ::testing::Values("gpt2", "qwen2", "llama3-strip"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

TEST(TokenizerFixtures, Qwen2ConfigBosEos) {
  const Tokenizer tok = Tokenizer::from_dir(kFixtures + "/qwen2");
  const auto eot = tok.token_to_id("<|endoftext|>");
  const auto im_end = tok.token_to_id("<|im_end|>");
  ASSERT_TRUE(eot && im_end);
  // tokenizer_config has bos_token null, so generation_config's bos_token_id is used.
  EXPECT_EQ(tok.bos_id(), *eot);
  EXPECT_TRUE(tok.add_bos());
  // eos_token from tokenizer_config first, then generation_config's list without duplicates.
  EXPECT_EQ(tok.eos_ids(), (std::vector<int32_t>{*im_end, *eot}));
  EXPECT_TRUE(tok.is_eos(*eot));
  // The non-special added token "café" is matched after NFC, also from decomposed input.
  const auto cafe = tok.token_to_id("café");
  ASSERT_TRUE(cafe);
  EXPECT_FALSE(tok.is_special(*cafe));
  EXPECT_EQ(tok.encode("cafe\xCC\x81", false), std::vector<int32_t>{*cafe});
}

TEST(TokenizerFixtures, TemplateWithSuffix) {
  const Tokenizer tok = Tokenizer::from_json_file(kFixtures + "/llama3-strip/tokenizer.json");
  const auto bos = tok.token_to_id("<|begin_of_text|>");
  const auto eos = tok.token_to_id("<|end_of_text|>");
  ASSERT_TRUE(bos && eos);
  EXPECT_EQ(tok.template_prefix(), std::vector<int32_t>{*bos});
  EXPECT_EQ(tok.template_suffix(), std::vector<int32_t>{*eos});
  EXPECT_TRUE(tok.add_bos());
  const auto ids = tok.encode("hi");
  EXPECT_EQ(ids.front(), *bos);
  EXPECT_EQ(ids.back(), *eos);
  EXPECT_EQ(tok.encode(""), (std::vector<int32_t>{*bos, *eos}));
}

TEST(TokenizerRef, ConcurrentEncodeIsConsistent) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  const std::string text = "The quick brown fox jumps over the lazy dog 12345 東京 😀\n";
  std::string big;
  for (int i = 0; i < 200; ++i) big += text + std::to_string(i) + " ";
  const auto want = tok.encode(big);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      const Tokenizer copy = tok;  // copies share the loaded tables
      ok[t] = copy.encode(big) == want;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok, std::vector<int>(4, 1));
}

TEST(TokenizerRef, TimingOnTestTxt) {
  const std::string path = std::string(SPEAR_SHARED_DIR) + "/data/test.txt";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not present";
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  const std::string text = read_file(path);
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ timing ] encode %s: %zu bytes -> %zu tokens in %.3f s (%.1f MB/s)\n",
              path.c_str(), text.size(), ids.size(), s, text.size() / s / 1e6);
  EXPECT_EQ(tok.decode(ids), text);
}
