#pragma once
// GPT-2 byte-level alphabet: every byte is written as one printable code point so BPE vocabularies
// can be stored as JSON text. SPEAR works on raw bytes internally; this map is only used to read
// vocab/merges strings and to feed byte-level lookups.
#include <array>
#include <optional>
#include <string>
#include <string_view>

namespace spear::tok {

// Code point that GPT-2's bytes_to_unicode() assigns to each byte.
const std::array<char32_t, 256>& byte_to_codepoint();

// The UTF-8 spelling of the byte-level character for byte b (what appears in tokenizer.json).
std::string_view byte_to_char(unsigned char b);

// Maps a byte-level token string back to raw bytes. Returns nullopt if any character is outside
// the 256-character alphabet (HF's ByteLevel decoder then falls back to the token's own UTF-8).
std::optional<std::string> byte_level_to_bytes(std::string_view token);

// Raw bytes -> byte-level spelling.
std::string bytes_to_byte_level(std::string_view bytes);

}  // namespace spear::tok
