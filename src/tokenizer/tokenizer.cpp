// Loading tokenizer.json (+ BOS/EOS configs) and running the encode/decode pipeline.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/utf8.h"

namespace spear {

using nlohmann::json;
using namespace tok;

struct Tokenizer::Impl {
  std::string path;
  Normalizer normalizer;
  PreTokenizer pretokenizer;
  std::unique_ptr<BpeModel> bpe;
  AddedVocab added;
  StringIdMap added_ids;               // content -> id
  std::vector<std::string> id_bytes;   // decoded bytes of each id
  std::vector<uint8_t> id_kind;        // 0 = unused id, 1 = normal, 2 = special
  std::vector<int32_t> prefix;         // post-processor ids before / after a single sequence
  std::vector<int32_t> suffix;
  std::optional<int32_t> bos;
  std::vector<int32_t> eos;

  void encode_valid(std::string_view text, std::vector<int32_t>& out) const;
  std::optional<int32_t> find(std::string_view token) const {
    if (auto it = added_ids.find(token); it != added_ids.end()) return it->second;
    if (auto it = bpe->vocab().find(token); it != bpe->vocab().end()) return it->second;
    return std::nullopt;
  }
  static std::shared_ptr<Impl> load(const std::string& path);
};

namespace {

json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("{}: cannot open file", path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

bool is_byte_level_decoder(const json& d) {
  if (!d.is_object() || !d.contains("type") || !d["type"].is_string()) return false;
  const auto type = d["type"].get<std::string>();
  if (type == "ByteLevel") return true;
  if (type != "Sequence" || !d.contains("decoders") || !d["decoders"].is_array()) return false;
  return !d["decoders"].empty() &&
         std::all_of(d["decoders"].begin(), d["decoders"].end(), is_byte_level_decoder);
}

// The ids a post-processor puts before and after a single sequence.
void parse_post_processor(const json& p, const std::string& where, std::vector<int32_t>& prefix,
                          std::vector<int32_t>& suffix) {
  if (p.is_null()) return;
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string())
    fail("{}: expected an object with a string \"type\"", where);
  const auto type = p["type"].get<std::string>();
  if (type == "ByteLevel") return;  // only adjusts offsets
  if (type == "Sequence") {
    if (!p.contains("processors") || !p["processors"].is_array())
      fail("{}: Sequence post_processor needs a \"processors\" array", where);
    for (size_t i = 0; i < p["processors"].size(); ++i) {
      std::vector<int32_t> pre;
      std::vector<int32_t> suf;
      parse_post_processor(p["processors"][i], fmt::format("{}.processors[{}]", where, i), pre,
                           suf);
      // Each processor wraps the output of the previous one.
      prefix.insert(prefix.begin(), pre.begin(), pre.end());
      suffix.insert(suffix.end(), suf.begin(), suf.end());
    }
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](const char* k) {
      if (!p.contains(k) || !p[k].is_array() || p[k].size() != 2 || !p[k][1].is_number_integer())
        fail("{}.{}: expected [token, id]", where, k);
      return p[k][1].get<int32_t>();
    };
    prefix.push_back(id_of("cls"));
    suffix.push_back(id_of("sep"));
    return;
  }
  if (type != "TemplateProcessing")
    fail("{}: unsupported post_processor type '{}' (supported: TemplateProcessing, ByteLevel, "
         "Sequence, RobertaProcessing, BertProcessing)", where, type);
  if (!p.contains("single") || !p["single"].is_array())
    fail("{}.single: missing or not an array", where);
  const json specials = p.value("special_tokens", json::object());
  bool seen_a = false;
  for (size_t i = 0; i < p["single"].size(); ++i) {
    const json& item = p["single"][i];
    if (item.contains("Sequence")) {
      const auto seq = item["Sequence"].value("id", std::string("A"));
      if (seq != "A" || seen_a) fail("{}.single[{}]: only one Sequence A is supported", where, i);
      seen_a = true;
    } else if (item.contains("SpecialToken")) {
      const auto name = item["SpecialToken"].value("id", std::string());
      if (!specials.contains(name) || !specials[name].contains("ids") ||
          !specials[name]["ids"].is_array())
        fail("{}.single[{}]: special token '{}' is not in special_tokens", where, i, name);
      auto& dst = seen_a ? suffix : prefix;
      for (const auto& id : specials[name]["ids"]) dst.push_back(id.get<int32_t>());
    } else {
      fail("{}.single[{}]: expected SpecialToken or Sequence", where, i);
    }
  }
  if (!seen_a) fail("{}.single: template has no Sequence A", where);
}

}  // namespace

void Tokenizer::Impl::encode_valid(std::string_view text, std::vector<int32_t>& out) const {
  auto word = [&](std::string_view w) { bpe->encode_word(w, out); };
  auto token = [&](int32_t id) { out.push_back(id); };
  auto normalized_piece = [&](std::string_view piece) {
    std::string storage;
    const std::string_view n = normalizer.apply(piece, storage);
    if (added.empty(true)) {
      pretokenizer.split(n, word);
    } else {
      added.split(n, true, [&](std::string_view t) { pretokenizer.split(t, word); }, token);
    }
  };
  if (added.empty(false)) {
    normalized_piece(text);
  } else {
    added.split(text, false, normalized_piece, token);
  }
}

Tokenizer Tokenizer::from_json_file(const std::string& path) {
  return Tokenizer(Impl::load(path));
}

std::shared_ptr<Tokenizer::Impl> Tokenizer::Impl::load(const std::string& path) {
  const json j = read_json(path);
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  try {
    if (!j.is_object()) fail("{}: top level must be a JSON object", path);
    if (!j.contains("model")) fail("{}: missing \"model\"", path);
    impl->normalizer = Normalizer::from_json(j.value("normalizer", json()), path + ": normalizer");
    impl->pretokenizer =
        PreTokenizer::from_json(j.value("pre_tokenizer", json()), path + ": pre_tokenizer");
    if (!impl->pretokenizer.has_byte_level())
      fail("{}: pre_tokenizer must end with ByteLevel (only byte-level BPE is supported)", path);
    const json decoder = j.value("decoder", json());
    if (!is_byte_level_decoder(decoder))
      fail("{}: decoder must be ByteLevel (got {})", path, decoder.dump());
    impl->bpe = BpeModel::from_json(j["model"], path + ": model");

    const json added = j.value("added_tokens", json::array());
    if (!added.is_array()) fail("{}: added_tokens must be an array", path);
    for (size_t i = 0; i < added.size(); ++i) {
      const json& a = added[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"] < 0 ||
          !a.contains("content") || !a["content"].is_string())
        fail("{}: added_tokens[{}]: needs integer \"id\" >= 0 and string \"content\"", path, i);
      AddedToken t;
      t.content = a["content"].get<std::string>();
      t.id = a["id"].get<int32_t>();
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      t.normalized = a.value("normalized", !t.special);
      impl->added_ids[t.content] = t.id;
      impl->added.add(std::move(t));
    }

    int32_t max_id = -1;
    for (const auto& [spelling, id] : impl->bpe->vocab()) max_id = std::max(max_id, id);
    for (const auto& t : impl->added.tokens()) max_id = std::max(max_id, t.id);
    impl->id_bytes.assign(static_cast<size_t>(max_id + 1), std::string());
    impl->id_kind.assign(static_cast<size_t>(max_id + 1), 0);
    // HF's ByteLevel decoder maps a token's characters back to bytes, or keeps the token's own
    // UTF-8 when a character is outside the byte alphabet.
    for (const auto& [spelling, id] : impl->bpe->vocab()) {
      auto raw = byte_level_to_bytes(spelling);
      impl->id_bytes[id] = raw ? std::move(*raw) : spelling;
      impl->id_kind[id] = 1;
    }
    // Added tokens decode to their content. HF also sends them through the byte-level map, which
    // gives the same bytes for ASCII tokens but mangles non-ASCII ones ("café" -> "caf\xE9").
    for (const auto& t : impl->added.tokens()) {
      impl->id_bytes[t.id] = t.content;
      impl->id_kind[t.id] = t.special ? 2 : 1;
    }

    parse_post_processor(j.value("post_processor", json()), path + ": post_processor",
                         impl->prefix, impl->suffix);
    for (int32_t id : impl->prefix)
      if (id < 0 || id > max_id) fail("{}: post_processor uses unknown id {}", path, id);
    for (int32_t id : impl->suffix)
      if (id < 0 || id > max_id) fail("{}: post_processor uses unknown id {}", path, id);
    if (!impl->prefix.empty()) impl->bos = impl->prefix.front();
  } catch (const json::exception& e) {
    fail("{}: malformed tokenizer: {}", path, e.what());
  }
  return impl;
}

Tokenizer Tokenizer::from_dir(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  auto impl = Impl::load((dir / "tokenizer.json").string());

  auto optional_json = [&](const char* name) -> std::pair<json, std::string> {
    const auto p = (dir / name).string();
    if (!fs::exists(p)) return {json(), p};
    return {read_json(p), p};
  };
  auto ids_of = [](const json& v, const std::string& where) {
    std::vector<int32_t> ids;
    if (v.is_number_integer()) ids.push_back(v.get<int32_t>());
    else if (v.is_array())
      for (const auto& x : v) {
        if (!x.is_number_integer()) fail("{}: expected integer ids", where);
        ids.push_back(x.get<int32_t>());
      }
    else if (!v.is_null()) fail("{}: expected an integer or a list of integers", where);
    return ids;
  };
  // tokenizer_config.json names tokens ("<|end_of_text|>" or {"content": ...}).
  auto token_field = [&](const json& cfg, const char* key, const std::string& file)
      -> std::optional<int32_t> {
    if (!cfg.is_object() || !cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
    const json& v = cfg[key];
    std::string name;
    if (v.is_string()) name = v.get<std::string>();
    else if (v.is_object() && v.contains("content") && v["content"].is_string())
      name = v["content"].get<std::string>();
    else fail("{}: {} must be a string or {{\"content\": ...}}", file, key);
    return impl->find(name);
  };

  const auto [tcfg, tcfg_path] = optional_json("tokenizer_config.json");
  const auto [gcfg, gcfg_path] = optional_json("generation_config.json");
  const auto [mcfg, mcfg_path] = optional_json("config.json");
  auto field = [](const json& cfg, const char* key) {
    return cfg.is_object() && cfg.contains(key) ? cfg[key] : json();
  };

  std::optional<int32_t> bos = token_field(tcfg, "bos_token", tcfg_path);
  for (const auto& [cfg, p] : {std::pair{gcfg, gcfg_path}, std::pair{mcfg, mcfg_path}}) {
    if (bos) break;
    auto ids = ids_of(field(cfg, "bos_token_id"), p + ": bos_token_id");
    if (!ids.empty()) bos = ids.front();
  }
  if (bos) impl->bos = bos;

  // EOS: everything that should stop generation. Chat models list several ids in
  // generation_config.json besides tokenizer_config's eos_token.
  std::vector<int32_t> eos;
  if (auto e = token_field(tcfg, "eos_token", tcfg_path)) eos.push_back(*e);
  for (int32_t id : ids_of(field(gcfg, "eos_token_id"), gcfg_path + ": eos_token_id")) eos.push_back(id);
  if (eos.empty()) eos = ids_of(field(mcfg, "eos_token_id"), mcfg_path + ": eos_token_id");
  for (int32_t id : eos)
    if (std::find(impl->eos.begin(), impl->eos.end(), id) == impl->eos.end()) impl->eos.push_back(id);
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  if (add_special) out = im.prefix;
  // Valid UTF-8 runs go through the full pipeline; each invalid byte becomes its own byte token,
  // which keeps the round trip exact without handing invalid text to PCRE2 or utf8proc.
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t run = valid_utf8_run(text, pos);
    if (run > 0) im.encode_valid(text.substr(pos, run), out);
    pos += run;
    if (pos < text.size()) im.bpe->encode_word(text.substr(pos++, 1), out);
  }
  if (add_special) out.insert(out.end(), im.suffix.begin(), im.suffix.end());
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& im = *impl_;
  std::string out;
  for (int32_t id : ids) {
    // Like HF, ids outside the vocabulary (e.g. padded embedding rows) decode to nothing.
    if (id < 0 || static_cast<size_t>(id) >= im.id_kind.size() || im.id_kind[id] == 0) continue;
    if (skip_special && im.id_kind[id] == 2) continue;
    out += im.id_bytes[id];
  }
  return out;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const Impl& im = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= im.id_kind.size() || im.id_kind[id] == 0)
    fail("{}: token id {} is not in the vocabulary", im.path, id);
  return im.id_bytes[id];
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  return impl_->find(token);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_kind.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::vector<int32_t> Tokenizer::eos_ids() const { return impl_->eos; }
bool Tokenizer::is_eos(int32_t id) const {
  return std::find(impl_->eos.begin(), impl_->eos.end(), id) != impl_->eos.end();
}
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[id] == 2;
}
bool Tokenizer::add_bos() const {
  return impl_->bos && !impl_->prefix.empty() && impl_->prefix.front() == *impl_->bos;
}
const std::vector<int32_t>& Tokenizer::template_prefix() const { return impl_->prefix; }
const std::vector<int32_t>& Tokenizer::template_suffix() const { return impl_->suffix; }

std::string StreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_->is_special(id)) return {};
  const int32_t ids[1] = {id};
  pending_ += tok_->decode(ids);
  const size_t n = utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, n);
  pending_.erase(0, n);
  return out;
}

std::string StreamDecoder::flush() { return std::exchange(pending_, std::string()); }

}  // namespace spear
