#pragma once
// Added tokens ("added_tokens" in tokenizer.json) are matched in the text before the normal
// pipeline runs, so a literal "<|im_start|>" becomes one id instead of being split by the regex.
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace spear::tok {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  // HF matches normalized=false tokens on the raw text and normalized=true ones on the
  // normalizer's output.
  bool normalized = false;
};

class AddedVocab {
 public:
  void add(AddedToken t);
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  bool empty(bool normalized) const { return count_[normalized] == 0; }

  // Splits valid UTF-8 `text` on the tokens whose `normalized` flag matches, leftmost-longest
  // like HF's Aho-Corasick matcher. Plain text between matches goes to on_text (never empty).
  void split(std::string_view text, bool normalized,
             const std::function<void(std::string_view)>& on_text,
             const std::function<void(int32_t)>& on_token) const;

 private:
  std::vector<AddedToken> tokens_;
  // Candidates per first byte, longest first, one table per `normalized` value.
  std::array<std::array<std::vector<uint32_t>, 256>, 2> by_first_{};
  std::array<size_t, 2> count_{};
};

}  // namespace spear::tok
