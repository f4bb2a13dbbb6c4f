// decode(encode(s)) == s for arbitrary text, and partial UTF-8 handling while streaming.
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <utf8proc.h>

#include "tokenizer/tokenizer.h"

using spear::Tokenizer;

namespace {

const std::string kRefModel = std::string(SPEAR_SOURCE_DIR) + "/models/ref-llama-23m";
const std::string kFixtures = std::string(SPEAR_SOURCE_DIR) + "/tests/fixtures/tokenizers";

std::string utf8(char32_t cp) {
  std::string s;
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  s.assign(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  return s;
}

// Random text built from the pieces that stress the regexes and the byte-level mapping.
std::string random_text(std::mt19937& rng, bool with_specials) {
  static const std::vector<std::string> kFixed = {
      "é", "ñ", "東", "京", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\xCC\x81" /* combining acute */,
      "\xEF\xBF\xBD" /* U+FFFD */, "\xE2\x80\x8D" /* ZWJ */, "\xC2\xA0", "\xE2\x80\xA8", "\xC2\x85",
      "ß", "ǅ", "Ω", "я", "ا", "한", "ｱ", "𝕏", "'s", "'T", "'re", "'LL", "'d", "'M", "'ve", "I'M",
      "don't", "...", "--", "\r\n", "1234567", "3.14", "http://x.y/z?a=b", "#", "\"", "\\"};
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int> len(1, 12);
  std::string s;
  const int pieces = std::uniform_int_distribution<int>(0, 25)(rng);
  for (int p = 0; p < pieces; ++p) {
    const int n = len(rng);
    switch (kind(rng)) {
      case 0:
      case 1:
        for (int i = 0; i < n; ++i) s += static_cast<char>(std::uniform_int_distribution<int>(32, 126)(rng));
        break;
      case 2: {
        static const char ws[] = {' ', ' ', ' ', '\t', '\n', '\r'};
        for (int i = 0; i < n; ++i) s += ws[std::uniform_int_distribution<int>(0, 5)(rng)];
        break;
      }
      case 3:
        for (int i = 0; i < n; ++i) s += static_cast<char>('0' + rng() % 10);
        break;
      case 4:
      case 5:
        s += kFixed[rng() % kFixed.size()];
        break;
      case 6: {  // random code point of each UTF-8 length, skipping surrogates
        const int bytes = 2 + static_cast<int>(rng() % 3);
        char32_t cp = bytes == 2   ? 0x80 + rng() % (0x800 - 0x80)
                      : bytes == 3 ? 0x800 + rng() % (0x10000 - 0x800)
                                   : 0x10000 + rng() % (0x110000 - 0x10000);
        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xE000;
        s += utf8(cp);
        break;
      }
      case 7:
        for (int i = 0; i < n; ++i) s += static_cast<char>('a' + rng() % 26);
        break;
      case 8:
        for (int i = 0; i < n; ++i) s += static_cast<char>('A' + rng() % 26);
        break;
      default:
        if (with_specials && rng() % 4 == 0) s += "<|begin_of_text|>";
        else s += " ";
    }
  }
  return s;
}

std::string nfc(const std::string& s) {
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                              static_cast<utf8proc_ssize_t>(s.size()), &out,
                              static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  std::string r(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  free(out);
  return r;
}

}  // namespace

TEST(TokenizerRoundTrip, RandomUnicodeRefModel) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  std::mt19937 rng(1234);
  for (int i = 0; i < 3000; ++i) {
    const std::string s = random_text(rng, /*with_specials=*/true);
    const auto ids = tok.encode(s, false);
    ASSERT_EQ(tok.decode(ids), s) << "case " << i;
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
  }
}

TEST(TokenizerRoundTrip, RandomUnicodeGpt2AndQwen2) {
  const Tokenizer gpt2 = Tokenizer::from_dir(kFixtures + "/gpt2");
  const Tokenizer qwen2 = Tokenizer::from_dir(kFixtures + "/qwen2");
  std::mt19937 rng(99);
  for (int i = 0; i < 2000; ++i) {
    const std::string s = random_text(rng, false);
    ASSERT_EQ(gpt2.decode(gpt2.encode(s, false)), s) << "case " << i;
    // Qwen2 normalizes to NFC first, so that is what comes back.
    ASSERT_EQ(qwen2.decode(qwen2.encode(s, false)), nfc(s)) << "case " << i;
  }
}

TEST(TokenizerRoundTrip, InvalidUtf8KeepsBytes) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  std::mt19937 rng(7);
  const std::vector<std::string> fixed = {"\xFF", "\xC3", "abc\xE6\x9D", "\xED\xA0\x80 surrogate",
                                          "\xC0\xAF overlong", "x\x80\x80y", "\xF4\x90\x80\x80",
                                          std::string("nul\0byte", 8)};
  for (const auto& s : fixed) EXPECT_EQ(tok.decode(tok.encode(s, false)), s);
  for (int i = 0; i < 1000; ++i) {
    std::string s(rng() % 40, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    ASSERT_EQ(tok.decode(tok.encode(s, false)), s) << "case " << i;
  }
}

TEST(TokenizerUtf8, CompletePrefix) {
  using spear::utf8_complete_prefix;
  EXPECT_EQ(utf8_complete_prefix(""), 0u);
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("\xC3"), 0u);
  EXPECT_EQ(utf8_complete_prefix("a\xC3"), 1u);
  EXPECT_EQ(utf8_complete_prefix("a\xC3\xA9"), 3u);
  EXPECT_EQ(utf8_complete_prefix("\xE6\x9D"), 0u);
  EXPECT_EQ(utf8_complete_prefix("\xE6\x9D\xB1"), 3u);
  EXPECT_EQ(utf8_complete_prefix("ok\xF0\x9F\x98"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ok\xF0\x9F\x98\x80"), 6u);
  // Bytes that can never complete are passed through rather than held back forever.
  EXPECT_EQ(utf8_complete_prefix("\x80"), 1u);
  EXPECT_EQ(utf8_complete_prefix("\xFF"), 1u);
  EXPECT_EQ(utf8_complete_prefix("\x80\x80\x80\x80"), 4u);
}

TEST(TokenizerUtf8, TokenBoundaryInsideCharacter) {
  const Tokenizer tok = Tokenizer::from_dir(kRefModel);
  const std::string text = "A 😀 and 東京!";
  const auto ids = tok.encode(text, false);
  // The tiny vocab has no emoji token, so the emoji is split into byte tokens.
  const size_t emoji_at = std::string("A ").size();
  bool saw_partial = false;
  std::string streamed;
  spear::StreamDecoder stream(tok);
  for (size_t n = 0; n <= ids.size(); ++n) {
    const std::string prefix = tok.decode(std::span(ids.data(), n));
    const size_t complete = spear::utf8_complete_prefix(prefix);
    EXPECT_EQ(text.compare(0, prefix.size(), prefix), 0) << n;
    if (complete != prefix.size()) {
      saw_partial = true;
      EXPECT_GE(complete, emoji_at);
    }
    if (n > 0) {
      const std::string chunk = stream.push(ids[n - 1]);
      EXPECT_EQ(spear::utf8_complete_prefix(chunk), chunk.size());
      streamed += chunk;
      EXPECT_EQ(streamed, prefix.substr(0, complete));
    }
  }
  EXPECT_TRUE(saw_partial);
  EXPECT_EQ(streamed + stream.flush(), text);
}
