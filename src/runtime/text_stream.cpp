#include "runtime/text_stream.h"

#include <algorithm>

#include "tokenizer/tokenizer.h"  // utf8_complete_prefix

namespace spear {

TextStream::TextStream(Decode decode, std::vector<std::string> stops) : decode_(std::move(decode)) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string TextStream::push(int32_t token) {
  if (stopped_) return {};
  full_ += decode_(std::span<const int32_t>(&token, 1));  // byte-level decoding concatenates per token
  const std::string& full = full_;
  // A stop string anywhere in the not-yet-final part ends the text before it.
  size_t cut = std::string::npos;
  for (const std::string& st : stops_) {
    const size_t from = sent_.size() >= st.size() ? sent_.size() - st.size() + 1 : 0;
    const size_t at = full.find(st, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string delta = cut > sent_.size() ? full.substr(sent_.size(), cut - sent_.size()) : std::string();
    sent_ += delta;
    return delta;
  }
  // Hold back a suffix that could begin a stop string, and an unfinished UTF-8 character.
  size_t safe = utf8_complete_prefix(full);
  for (const std::string& st : stops_)
    for (size_t k = std::min(st.size() - 1, full.size()); k > 0; --k)
      if (full.compare(full.size() - k, k, st, 0, k) == 0) {
        safe = std::min(safe, full.size() - k);
        break;
      }
  if (safe <= sent_.size()) return {};
  std::string delta = full.substr(sent_.size(), safe - sent_.size());
  sent_ += delta;
  return delta;
}

std::string TextStream::flush() {
  if (stopped_) return {};
  if (full_.size() <= sent_.size()) return {};
  std::string delta = full_.substr(sent_.size());
  sent_ += delta;
  return delta;
}

}  // namespace spear
