#pragma once
// Small UTF-8 helpers shared by the tokenizer stages. Validation follows RFC 3629 (no overlongs,
// no surrogates, nothing above U+10FFFF), the same rules PCRE2 and utf8proc enforce, so text that
// passes here is safe to hand to both.
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace spear::tok {

std::string encode_utf8(char32_t cp);

// Decodes one code point at pos and advances pos past it. On an invalid sequence returns nullopt
// and advances pos by one byte, so callers can resynchronise.
std::optional<char32_t> decode_utf8(std::string_view s, size_t& pos);

// Length of the longest valid UTF-8 run starting at pos.
size_t valid_utf8_run(std::string_view s, size_t pos);

// Rust's char::is_whitespace (Unicode White_Space), used by HF for lstrip/rstrip of added tokens.
bool is_unicode_whitespace(char32_t cp);
// Rust regex's \w (Alphabetic, marks, Nd, Pc, Join_Control), which HF uses to decide whether a
// single_word added token touches a word.
bool is_word_char(char32_t cp);

// Last / first code point of a valid UTF-8 string (nullopt if empty).
std::optional<char32_t> last_codepoint(std::string_view s);
std::optional<char32_t> first_codepoint(std::string_view s);

}  // namespace spear::tok
