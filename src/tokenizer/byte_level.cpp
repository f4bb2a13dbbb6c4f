#include "tokenizer/byte_level.h"

#include <unordered_map>

#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

struct Tables {
  std::array<char32_t, 256> cp{};
  std::array<std::string, 256> utf8;
  std::unordered_map<char32_t, unsigned char> rev;

  Tables() {
    // Printable Latin-1 bytes keep their own code point; the rest (controls, space, 0x7F-0xA0,
    // 0xAD) are shifted to 256+n in byte order, exactly as GPT-2's bytes_to_unicode().
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      cp[b] = keep ? char32_t(b) : char32_t(256 + n++);
      utf8[b] = encode_utf8(cp[b]);
      rev.emplace(cp[b], static_cast<unsigned char>(b));
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::array<char32_t, 256>& byte_to_codepoint() { return tables().cp; }

std::string_view byte_to_char(unsigned char b) { return tables().utf8[b]; }

std::optional<std::string> byte_level_to_bytes(std::string_view token) {
  const auto& rev = tables().rev;
  std::string out;
  out.reserve(token.size());
  size_t pos = 0;
  while (pos < token.size()) {
    auto cp = decode_utf8(token, pos);
    if (!cp) return std::nullopt;
    auto it = rev.find(*cp);
    if (it == rev.end()) return std::nullopt;
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) out += byte_to_char(b);
  return out;
}

}  // namespace spear::tok
