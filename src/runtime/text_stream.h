#pragma once
// Incremental detokenization for streaming: turns the generated token ids into text deltas that are safe to
// send: no partial UTF-8 character, and nothing that may still turn out to be the start of a stop string.
// When a stop string appears, the text ends just before it (OpenAI semantics: the stop string is not returned).
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace spear {

class TextStream {
 public:
  // Must be concatenative (the text of a token list is the texts of its tokens in order), as byte-level BPE
  // is: each push decodes only the new token.
  using Decode = std::function<std::string(std::span<const int32_t>)>;
  TextStream(Decode decode, std::vector<std::string> stops);
  // Appends a token; returns the text that became final. stopped() turns true when a stop string matched.
  std::string push(int32_t token);
  // The rest of the text when generation ends for another reason (length, EOS): held-back bytes included,
  // partial UTF-8 at the very end included as is.
  std::string flush();
  bool stopped() const { return stopped_; }
  const std::string& text() const { return sent_; }  // everything returned so far

 private:
  Decode decode_;
  std::vector<std::string> stops_;
  std::string full_;  // the text of every token pushed so far
  std::string sent_;
  bool stopped_ = false;
};

}  // namespace spear
