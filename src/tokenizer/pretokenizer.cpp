#include "tokenizer/pretokenizer.h"

#include <cstdlib>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear::tok {
namespace {

using nlohmann::json;

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    fail("{}: expected an object with a string \"type\"", where);
  return j["type"].get<std::string>();
}

// The GPT-2 pattern HF's ByteLevel pre-tokenizer uses when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// HF runs these patterns through Oniguruma, whose \s is exactly Unicode White_Space. PCRE2's UCP
// \s differs at the edges (PCRE2 10.42 also matches U+180E), so spell the class out: White_Space
// is \t-\r, U+0085 and the Z categories. \S inside a class has no such simple spelling and is
// left alone.
std::string rewrite_whitespace_classes(std::string_view p) {
  constexpr std::string_view kWs = R"(\t-\r\x{85}\p{Z})";
  std::string out;
  out.reserve(p.size() + 32);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[i + 1];
      if (n == 's') {
        out += in_class ? std::string(kWs) : "[" + std::string(kWs) + "]";
      } else if (n == 'S' && !in_class) {
        out += "[^" + std::string(kWs) + "]";
      } else {
        out += c;
        out += n;
      }
      ++i;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

// Per-thread PCRE2 match state, so a const Tokenizer can be used from many threads.
struct MatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* ctx = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
  MatchState() {
    if (stack) pcre2_jit_stack_assign(ctx, nullptr, stack);
  }
  ~MatchState() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(ctx);
    if (stack) pcre2_jit_stack_free(stack);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------- Normalizer

Normalizer Normalizer::from_json(const json& j, const std::string& where) {
  Normalizer n;
  if (j.is_null()) return n;
  const std::string type = type_of(j, where);
  if (type == "Sequence") {
    if (!j.contains("normalizers") || !j["normalizers"].is_array())
      fail("{}: Sequence normalizer needs a \"normalizers\" array", where);
    for (size_t i = 0; i < j["normalizers"].size(); ++i) {
      auto sub = from_json(j["normalizers"][i], fmt::format("{}.normalizers[{}]", where, i));
      n.forms_.insert(n.forms_.end(), sub.forms_.begin(), sub.forms_.end());
    }
  } else if (type == "NFC") {
    n.forms_.push_back(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  } else if (type == "NFD") {
    n.forms_.push_back(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  } else if (type == "NFKC") {
    n.forms_.push_back(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  } else if (type == "NFKD") {
    n.forms_.push_back(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  } else {
    fail("{}: unsupported normalizer type '{}' (supported: NFC, NFD, NFKC, NFKD, Sequence)", where,
         type);
  }
  return n;
}

std::string_view Normalizer::apply(std::string_view in, std::string& storage) const {
  if (forms_.empty()) return in;
  // Unicode normalization never changes ASCII, which is most of the text we see.
  bool ascii = true;
  for (char c : in) {
    if (static_cast<unsigned char>(c) >= 0x80) { ascii = false; break; }
  }
  if (ascii) return in;
  std::string cur(in);
  for (int opts : forms_) {
    utf8proc_uint8_t* dst = nullptr;
    const auto len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(cur.data()),
                                  static_cast<utf8proc_ssize_t>(cur.size()), &dst,
                                  static_cast<utf8proc_option_t>(opts));
    if (len < 0) fail("tokenizer normalizer: utf8proc failed: {}", utf8proc_errmsg(len));
    cur.assign(reinterpret_cast<const char*>(dst), static_cast<size_t>(len));
    std::free(dst);
  }
  storage = std::move(cur);
  return storage;
}

// --------------------------------------------------------------------------------------- Regex

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

Regex::Regex(std::string_view pattern, bool literal, const std::string& where) {
  const std::string pat = literal ? std::string(pattern) : rewrite_whitespace_classes(pattern);
  uint32_t opts = PCRE2_UTF | PCRE2_UCP;
  if (literal) opts |= PCRE2_LITERAL;
  int err = 0;
  PCRE2_SIZE off = 0;
  auto code = std::make_shared<Code>();
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), opts, &err,
                             &off, nullptr);
  if (!code->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail("{}: cannot compile regex '{}' at offset {}: {}", where, pattern, off,
         reinterpret_cast<const char*>(msg));
  }
  // JIT is an optimisation only; the interpreter gives the same matches if it is unavailable.
  pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);
  code_ = std::move(code);
}

bool Regex::find(std::string_view text, size_t from, size_t& begin, size_t& end) const {
  thread_local MatchState st;
  if (!st.data || !st.ctx) fail("tokenizer: out of memory creating PCRE2 match data");
  const int rc = pcre2_match(code_->code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                             from, PCRE2_NO_UTF_CHECK | PCRE2_NOTEMPTY, st.data, st.ctx);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    fail("tokenizer: regex match failed: {}", reinterpret_cast<const char*>(msg));
  }
  // rc == 0 only means the ovector was too small for the capture groups; group 0 is still set.
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
  begin = ov[0];
  end = ov[1];
  return true;
}

// -------------------------------------------------------------------------------- PreTokenizer

PreTokenizer PreTokenizer::from_json(const json& j, const std::string& where) {
  PreTokenizer pt;
  if (j.is_null()) return pt;
  const std::string type = type_of(j, where);
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      fail("{}: Sequence pre_tokenizer needs a \"pretokenizers\" array", where);
    for (size_t i = 0; i < j["pretokenizers"].size(); ++i) {
      auto sub = from_json(j["pretokenizers"][i], fmt::format("{}.pretokenizers[{}]", where, i));
      pt.steps_.insert(pt.steps_.end(), sub.steps_.begin(), sub.steps_.end());
    }
  } else if (type == "Split") {
    const std::string behavior = j.value("behavior", std::string("Isolated"));
    if (behavior != "Isolated")
      fail("{}: unsupported Split behavior '{}' (only Isolated)", where, behavior);
    if (j.value("invert", false)) fail("{}: Split with invert=true is not supported", where);
    if (!j.contains("pattern") || !j["pattern"].is_object())
      fail("{}: Split needs a \"pattern\" object", where);
    const json& p = j["pattern"];
    Step s{Step::kSplit, nullptr, false};
    if (p.contains("Regex") && p["Regex"].is_string()) {
      s.regex = std::make_shared<Regex>(p["Regex"].get<std::string>(), false, where);
    } else if (p.contains("String") && p["String"].is_string()) {
      s.regex = std::make_shared<Regex>(p["String"].get<std::string>(), true, where);
    } else {
      fail("{}: Split pattern must be {{\"Regex\": ...}} or {{\"String\": ...}}", where);
    }
    pt.steps_.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    Step s{Step::kByteLevel, nullptr, j.value("add_prefix_space", false)};
    if (j.value("use_regex", true)) s.regex = std::make_shared<Regex>(kGpt2Pattern, false, where);
    pt.steps_.push_back(std::move(s));
  } else {
    fail("{}: unsupported pre_tokenizer type '{}' (supported: Sequence, Split, ByteLevel)", where,
         type);
  }
  // Splits after the byte-level mapping would see the mapped alphabet, which we never build.
  bool seen_byte_level = false;
  for (const auto& s : pt.steps_) {
    if (seen_byte_level)
      fail("{}: pre-tokenizer steps after ByteLevel are not supported", where);
    seen_byte_level = s.kind == Step::kByteLevel;
  }
  return pt;
}

bool PreTokenizer::has_byte_level() const {
  return !steps_.empty() && steps_.back().kind == Step::kByteLevel;
}

void PreTokenizer::split(std::string_view text,
                         const std::function<void(std::string_view)>& emit) const {
  if (!text.empty()) run(0, text, emit);
}

void PreTokenizer::run(size_t step, std::string_view text,
                       const std::function<void(std::string_view)>& emit) const {
  if (step == steps_.size()) {
    emit(text);
    return;
  }
  const Step& s = steps_[step];
  std::string prefixed;
  // HF's ByteLevel prepends the space to every piece reaching it, not just the first one.
  if (s.kind == Step::kByteLevel && s.add_prefix_space && text.front() != ' ') {
    prefixed.reserve(text.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(text);
    text = prefixed;
  }
  if (!s.regex) {
    run(step + 1, text, emit);
    return;
  }
  // Isolated: both matches and the gaps between them become pieces; empty pieces are dropped.
  size_t pos = 0;
  size_t b = 0;
  size_t e = 0;
  while (pos < text.size() && s.regex->find(text, pos, b, e)) {
    if (b > pos) run(step + 1, text.substr(pos, b - pos), emit);
    run(step + 1, text.substr(b, e - b), emit);
    pos = e;
  }
  if (pos < text.size()) run(step + 1, text.substr(pos), emit);
}

}  // namespace spear::tok
