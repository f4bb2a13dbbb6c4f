#include "tokenizer/added_tokens.h"

#include <algorithm>

#include "tokenizer/utf8.h"

namespace spear::tok {

void AddedVocab::add(AddedToken t) {
  if (t.content.empty()) return;  // would match everywhere; HF ignores these too
  const auto idx = static_cast<uint32_t>(tokens_.size());
  auto& bucket = by_first_[t.normalized][static_cast<unsigned char>(t.content[0])];
  tokens_.push_back(std::move(t));
  ++count_[tokens_.back().normalized];
  bucket.push_back(idx);
  std::stable_sort(bucket.begin(), bucket.end(), [&](uint32_t a, uint32_t b) {
    return tokens_[a].content.size() > tokens_[b].content.size();
  });
}

void AddedVocab::split(std::string_view text, bool normalized,
                       const std::function<void(std::string_view)>& on_text,
                       const std::function<void(int32_t)>& on_token) const {
  const auto& table = by_first_[normalized];
  size_t emitted = 0;  // text before this offset has been handed out
  size_t pos = 0;
  while (pos < text.size()) {
    const auto& bucket = table[static_cast<unsigned char>(text[pos])];
    const AddedToken* hit = nullptr;
    for (uint32_t idx : bucket) {
      const auto& c = tokens_[idx].content;
      if (text.compare(pos, c.size(), c) == 0) {
        hit = &tokens_[idx];
        break;
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + hit->content.size();
    pos = stop;  // the matcher resumes after the match even when it is discarded below
    if (hit->single_word) {
      auto before = last_codepoint(text.substr(0, start));
      auto after = first_codepoint(text.substr(stop));
      if ((before && is_word_char(*before)) || (after && is_word_char(*after))) continue;
    }
    if (hit->lstrip) {
      size_t s = start;
      while (s > emitted) {
        size_t p = s - 1;
        while (p > emitted && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
        size_t q = p;
        auto cp = decode_utf8(text, q);
        if (!cp || !is_unicode_whitespace(*cp)) break;
        s = p;
      }
      start = s;
    }
    if (hit->rstrip) {
      while (stop < text.size()) {
        size_t q = stop;
        auto cp = decode_utf8(text, q);
        if (!cp || !is_unicode_whitespace(*cp)) break;
        stop = q;
      }
      pos = stop;
    }
    if (start > emitted) on_text(text.substr(emitted, start - emitted));
    on_token(hit->id);
    emitted = stop;
  }
  if (emitted < text.size()) on_text(text.substr(emitted));
}

}  // namespace spear::tok
