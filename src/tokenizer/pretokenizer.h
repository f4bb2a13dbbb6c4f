#pragma once
// Text stages in front of BPE: the normalizer and the pre-tokenizer (regex splitting + byte-level).
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

class Normalizer {
 public:
  // j is tokenizer.json's "normalizer" (null allowed); `where` prefixes error messages.
  static Normalizer from_json(const nlohmann::json& j, const std::string& where);
  bool empty() const { return forms_.empty(); }
  // Input must be valid UTF-8. Returns a view of either `in` or `storage`.
  std::string_view apply(std::string_view in, std::string& storage) const;

 private:
  std::vector<int> forms_;  // utf8proc option masks, applied in order
};

// A compiled PCRE2 pattern (UTF + UCP, JIT when available) with HF/Oniguruma semantics for \s.
class Regex {
 public:
  Regex(std::string_view pattern, bool literal, const std::string& where);
  // Finds the next non-empty match at or after `from` in valid UTF-8 text.
  bool find(std::string_view text, size_t from, size_t& begin, size_t& end) const;

 private:
  struct Code;
  std::shared_ptr<const Code> code_;
};

class PreTokenizer {
 public:
  // j is tokenizer.json's "pre_tokenizer".
  static PreTokenizer from_json(const nlohmann::json& j, const std::string& where);
  bool has_byte_level() const;
  // Calls emit for every pre-token of valid UTF-8 `text`, as raw bytes (the byte-level character
  // mapping is left to the BPE model, which works on bytes directly).
  void split(std::string_view text, const std::function<void(std::string_view)>& emit) const;

 private:
  struct Step {
    enum Kind { kSplit, kByteLevel } kind;
    std::shared_ptr<Regex> regex;  // Split pattern, or GPT-2 pattern for ByteLevel use_regex
    bool add_prefix_space = false;
  };
  void run(size_t step, std::string_view text,
           const std::function<void(std::string_view)>& emit) const;
  std::vector<Step> steps_;
};

}  // namespace spear::tok
