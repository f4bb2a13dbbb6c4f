#include "tokenizer/utf8.h"

#include <utf8proc.h>

#include "tokenizer/tokenizer.h"

namespace spear {

size_t utf8_complete_prefix(std::string_view bytes) {
  // Walk back over at most three continuation bytes to the last lead byte; if the sequence it
  // starts is longer than what we have, the prefix ends just before it. Bytes that cannot start a
  // sequence count as complete so a stream of garbage never stalls the caller forever.
  const size_t n = bytes.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(bytes[n - back]);
    if ((c & 0xC0) == 0x80) continue;
    size_t need = 1;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) need = 3;
    else if (c >= 0xF0 && c <= 0xF4) need = 4;
    return back < need ? n - back : n;
  }
  return n;
}

namespace tok {

std::string encode_utf8(char32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

std::optional<char32_t> decode_utf8(std::string_view s, size_t& pos) {
  const size_t start = pos;
  auto at = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = at(start);
  ++pos;
  if (c < 0x80) return c;
  size_t len;
  char32_t cp;
  char32_t min;
  if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; min = 0x80; }
  else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; min = 0x800; }
  else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; min = 0x10000; }
  else return std::nullopt;
  if (start + len > s.size()) return std::nullopt;
  for (size_t i = 1; i < len; ++i) {
    const unsigned char cc = at(start + i);
    if ((cc & 0xC0) != 0x80) return std::nullopt;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return std::nullopt;
  pos = start + len;
  return cp;
}

size_t valid_utf8_run(std::string_view s, size_t pos) {
  const size_t start = pos;
  while (pos < s.size()) {
    // ASCII fast path: the common case for English text.
    if (static_cast<unsigned char>(s[pos]) < 0x80) { ++pos; continue; }
    size_t p = pos;
    if (!decode_utf8(s, p)) break;
    pos = p;
  }
  return pos - start;
}

bool is_unicode_whitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

bool is_word_char(char32_t cp) {
  if (cp == 0x200C || cp == 0x200D) return true;  // Join_Control
  // Other_Alphabetic symbols (circled / squared Latin letters) are Alphabetic though category So.
  if ((cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) ||
      (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189))
    return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

std::optional<char32_t> last_codepoint(std::string_view s) {
  if (s.empty()) return std::nullopt;
  size_t p = s.size() - 1;
  while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
  return decode_utf8(s, p);
}

std::optional<char32_t> first_codepoint(std::string_view s) {
  if (s.empty()) return std::nullopt;
  size_t p = 0;
  return decode_utf8(s, p);
}

}  // namespace tok
}  // namespace spear
