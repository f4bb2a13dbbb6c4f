#pragma once
// The BPE model of a byte-level tokenizer. It works on raw bytes: the GPT-2 byte->character
// mapping is undone once at load time, so encoding never builds mapped strings.
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // model is tokenizer.json's "model"; `where` prefixes error messages.
  static std::unique_ptr<BpeModel> from_json(const nlohmann::json& model, const std::string& where);

  // Appends the ids of one pre-token (raw bytes).
  void encode_word(std::string_view bytes, std::vector<int32_t>& out) const;

  // Vocabulary as spelled in tokenizer.json (byte-level alphabet).
  const StringIdMap& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  }
  const Merge* find_merge(int32_t a, int32_t b) const;
  void merge_word(std::string_view bytes, std::vector<int32_t>& out) const;

  StringIdMap vocab_;
  StringIdMap raw_vocab_;  // raw bytes -> id, for ignore_merges
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_id_{};  // id of each single-byte token, -1 if absent
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;

  // Words repeat constantly in natural text; caching their ids is the main speed-up.
  static constexpr size_t kCacheCapacity = 200000;
  static constexpr size_t kMaxCachedWordBytes = 256;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>
      cache_;
};

}  // namespace spear::tok
