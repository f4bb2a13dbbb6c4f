#include "tokenizer/bpe.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace spear::tok {

using nlohmann::json;

std::unique_ptr<BpeModel> BpeModel::from_json(const json& m, const std::string& where) {
  if (!m.is_object()) fail("{}: \"model\" must be an object", where);
  // Old files omit "type"; HF then recognises BPE by its merges.
  const std::string type =
      m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "BPE";
  if (type != "BPE") fail("{}.type: unsupported model type '{}' (only BPE)", where, type);
  if (!m.contains("vocab") || !m["vocab"].is_object())
    fail("{}.vocab: missing or not an object", where);
  if (!m.contains("merges") || !m["merges"].is_array())
    fail("{}.merges: missing or not an array", where);
  auto nonnull = [&](const char* k) { return m.contains(k) && !m[k].is_null(); };
  if (nonnull("continuing_subword_prefix") && !m["continuing_subword_prefix"].get<std::string>().empty())
    fail("{}.continuing_subword_prefix is not supported", where);
  if (nonnull("end_of_word_suffix") && !m["end_of_word_suffix"].get<std::string>().empty())
    fail("{}.end_of_word_suffix is not supported", where);
  if (nonnull("dropout") && m["dropout"].get<double>() > 0.0)
    fail("{}.dropout is not supported (non-deterministic)", where);
  if (m.value("byte_fallback", false)) fail("{}.byte_fallback is not supported", where);

  auto bpe = std::make_unique<BpeModel>();
  bpe->ignore_merges_ = m.value("ignore_merges", false);
  bpe->fuse_unk_ = m.value("fuse_unk", false);

  for (const auto& [tok, idj] : m["vocab"].items()) {
    if (!idj.is_number_integer() || idj.get<int64_t>() < 0 || idj.get<int64_t>() > INT32_MAX)
      fail("{}.vocab[\"{}\"]: id must be a non-negative 32-bit integer", where, tok);
    const auto id = idj.get<int32_t>();
    bpe->vocab_.emplace(tok, id);
    // Only tokens fully in the byte-level alphabet can be produced from input bytes.
    if (auto raw = byte_level_to_bytes(tok)) bpe->raw_vocab_.emplace(std::move(*raw), id);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = bpe->vocab_.find(byte_to_char(static_cast<unsigned char>(b)));
    bpe->byte_id_[b] = it == bpe->vocab_.end() ? -1 : it->second;
  }
  if (nonnull("unk_token")) {
    const auto unk = m["unk_token"].get<std::string>();
    auto it = bpe->vocab_.find(unk);
    if (it == bpe->vocab_.end()) fail("{}.unk_token '{}' is not in the vocab", where, unk);
    bpe->unk_id_ = it->second;
  }

  const json& merges = m["merges"];
  bpe->merges_.reserve(merges.size() * 2);
  auto lookup = [&](const std::string& t, size_t i) {
    auto it = bpe->vocab_.find(t);
    if (it == bpe->vocab_.end())
      fail("{}.merges[{}]: token '{}' is not in the vocab", where, i, t);
    return it->second;
  };
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& e = merges[i];
    std::string a;
    std::string b;
    // Two serialisations exist: "a b" (older files) and ["a", "b"] (tokens may contain spaces).
    if (e.is_string()) {
      const auto& s = e.get_ref<const std::string&>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos)
        fail("{}.merges[{}]: '{}' is not of the form \"left right\"", where, i, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      fail("{}.merges[{}]: expected \"a b\" or [\"a\", \"b\"]", where, i);
    }
    const int32_t ia = lookup(a, i);
    const int32_t ib = lookup(b, i);
    const int32_t inew = lookup(a + b, i);
    bpe->merges_[pair_key(ia, ib)] = Merge{static_cast<int32_t>(i), inew};
  }
  return bpe;
}

const BpeModel::Merge* BpeModel::find_merge(int32_t a, int32_t b) const {
  auto it = merges_.find(pair_key(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::encode_word(std::string_view bytes, std::vector<int32_t>& out) const {
  if (bytes.empty()) return;
  if (ignore_merges_) {
    if (auto it = raw_vocab_.find(bytes); it != raw_vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = bytes.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard lock(cache_mu_);
    if (auto it = cache_.find(bytes); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  merge_word(bytes, out);
  if (cacheable) {
    std::lock_guard lock(cache_mu_);
    if (cache_.size() < kCacheCapacity)
      cache_.emplace(std::string(bytes), std::vector<int32_t>(out.begin() + start, out.end()));
  }
}

void BpeModel::merge_word(std::string_view bytes, std::vector<int32_t>& out) const {
  // Doubly linked list of symbols; merged-away symbols get id -1. Merges are applied lowest rank
  // first, leftmost first among equal ranks, exactly like HF's priority queue in merge_word.
  struct Sym {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  thread_local std::vector<Sym> syms;
  syms.clear();
  for (unsigned char c : bytes) {
    int32_t id = byte_id_[c];
    if (id < 0) {
      // HF drops characters missing from the vocab when there is no unk token.
      if (!unk_id_) continue;
      if (fuse_unk_ && !syms.empty() && syms.back().id == *unk_id_) continue;
      id = *unk_id_;
    }
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, n + 1});
  }
  if (syms.empty()) return;
  syms.back().next = -1;

  struct Cand {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    // Min-heap on (rank, pos) via std::push_heap's max-heap: "less" means "comes later".
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Cand> heap;
  heap.clear();
  auto push_pair = [&](int32_t pos) {
    const int32_t nxt = syms[pos].next;
    if (nxt < 0) return;
    if (const Merge* m = find_merge(syms[pos].id, syms[nxt].id)) {
      heap.push_back({m->rank, pos, m->new_id});
      std::push_heap(heap.begin(), heap.end());
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push_pair(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Cand c = heap.back();
    heap.pop_back();
    Sym& left = syms[c.pos];
    if (left.id < 0 || left.next < 0) continue;
    // Stale entry: one side was merged since it was queued.
    const Merge* m = find_merge(left.id, syms[left.next].id);
    if (!m || m->new_id != c.new_id) continue;
    const int32_t right = left.next;
    left.id = c.new_id;
    left.next = syms[right].next;
    syms[right].id = -1;
    if (left.next >= 0) syms[left.next].prev = c.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(c.pos);
  }
  // Symbol 0 is never merged away (merges absorb the right neighbour), so the list starts there.
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

}  // namespace spear::tok
