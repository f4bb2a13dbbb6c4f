#pragma once
// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json, producing the same ids as the
// `tokenizers` library for the supported subset (GPT-2 / Llama-3 / Qwen2 style pipelines):
//   added tokens (raw text) -> normalizer (NFC...) -> pre-tokenizer (regex Split + ByteLevel)
//   -> BPE merges -> post-processor (BOS template).
// Unsupported component types are rejected at load time with spear::Error instead of silently
// producing different ids.
//
// Invalid UTF-8 input never throws: each invalid byte becomes its own byte-level token and the
// valid runs around it are tokenized independently, so decode(encode(s)) == s for any bytes.
// decode() returns raw bytes and does not replace anything with U+FFFD; a token list that stops in
// the middle of a character decodes to a string ending in a partial sequence (see
// utf8_complete_prefix / StreamDecoder for printing while streaming).
//
// Known differences from HF: added tokens decode to their content (HF pushes them through the
// byte-level map, which mangles non-ASCII ones); PCRE2's Unicode tables (14.0 for PCRE2 10.42)
// may classify code points assigned in later Unicode versions differently from HF's Oniguruma;
// added-token ids are taken from tokenizer.json as written (HF renumbers ones missing from the
// model vocab when the file's ids are inconsistent); truncation/padding/offsets are not handled.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"  // spear::Error, thrown by loading and token_bytes

namespace spear {

class Tokenizer {
 public:
  // Reads model_dir/tokenizer.json plus, when present, tokenizer_config.json,
  // generation_config.json and config.json for BOS/EOS.
  static Tokenizer from_dir(const std::string& model_dir);
  // tokenizer.json alone: BOS/EOS come only from the post-processor template (if any).
  static Tokenizer from_json_file(const std::string& tokenizer_json_path);

  // add_special applies the post-processor (e.g. the BOS prefix). Special tokens written in the
  // text are always recognised, as in HF with split_special_tokens=false.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  std::string token_bytes(int32_t id) const;  // throws for an id outside the vocabulary
  std::optional<int32_t> token_to_id(std::string_view token) const;  // as spelled in tokenizer.json
  int32_t vocab_size() const;  // max id + 1 over vocab and added tokens
  std::optional<int32_t> bos_id() const;
  std::vector<int32_t> eos_ids() const;
  bool is_eos(int32_t id) const;
  bool is_special(int32_t id) const;
  // True when encode(text, true) starts with bos_id() (taken from the post-processor template).
  bool add_bos() const;
  // Ids the post-processor puts around a single sequence.
  const std::vector<int32_t>& template_prefix() const;
  const std::vector<int32_t>& template_suffix() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Immutable after load (the word cache inside is internally synchronised), so copies share it
  // and concurrent encode()/decode() calls are safe.
  std::shared_ptr<const Impl> impl_;
};

// Length of the longest prefix of bytes that does not end inside a multi-byte UTF-8 character.
size_t utf8_complete_prefix(std::string_view bytes);

// Streaming detokenizer: feed ids one at a time, get back only complete UTF-8 characters.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true)
      : tok_(&tok), skip_special_(skip_special) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is left, even if it is an incomplete character

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace spear
