#include "serve/openai_api.h"

#include <utility>
#include <variant>

namespace spear::serve {

using nlohmann::json;

json ApiError::body() const {
  return {{"error",
           {{"message", message}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", nullptr}}}};
}

namespace {

ApiError bad(const std::string& msg, const std::string& param = {}) { return ApiError{400, msg, "invalid_request_error", param}; }

// The value of an optional numeric field, checked against [lo, hi]; std::nullopt when absent or null.
template <typename T>
std::optional<ApiError> number(const json& j, const char* key, T lo, T hi, T& out) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const json& v = j[key];
  if (!v.is_number() || (std::is_integral_v<T> && !v.is_number_integer()))
    return bad(std::string("'") + key + "' must be " + (std::is_integral_v<T> ? "an integer" : "a number"), key);
  const double d = v.get<double>();
  if (d < double(lo) || d > double(hi))
    return bad(std::string("'") + key + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                   ", got " + to_wire(v),
               key);
  out = v.get<T>();
  return std::nullopt;
}

// Options this server cannot honour, asked for: a 400 naming the option, not a reply that silently lacks what was
// asked (null, false, 0, an empty string or array, or {"type": "text"} ask for nothing and pass).
std::optional<ApiError> refuse_unsupported(const json& j, bool chat) {
  auto asked = [&](const char* key) {
    if (!j.contains(key)) return false;
    const json& v = j[key];
    if (v.is_null()) return false;
    if (v.is_boolean()) return v.get<bool>();
    if (v.is_number()) return v.get<double>() != 0;
    if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
    return true;
  };
  if (asked("logprobs") || asked("top_logprobs"))
    return bad("log probabilities are not supported by this server", asked("logprobs") ? "logprobs" : "top_logprobs");
  if (!chat && j.contains("best_of") && !j["best_of"].is_null() &&
      !(j["best_of"].is_number_integer() && j["best_of"].get<int64_t>() == 1))
    return bad("only best_of = 1 is supported", "best_of");
  if (!chat && asked("suffix")) return bad("'suffix' (insertion) is not supported", "suffix");
  if (chat) {
    for (const char* key : {"tools", "functions", "tool_choice", "function_call"})
      if (asked(key) && !(j[key].is_string() && j[key].get<std::string>() == "none"))
        return bad("tool and function calling are not supported", key);
    if (asked("response_format") &&
        !(j["response_format"].is_object() && j["response_format"].value("type", "") == "text"))
      return bad("only the text response format is supported", "response_format");
  }
  return std::nullopt;
}

}  // namespace

std::variant<GenerationRequest, ApiError> parse_request(const std::string& body, bool chat,
                                                        const std::string& served_model) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    return bad(std::string("the body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return bad("the body must be a JSON object");
  GenerationRequest r;
  r.chat = chat;
  if (j.contains("model") && !j["model"].is_null()) {
    if (!j["model"].is_string()) return bad("'model' must be a string", "model");
    r.model = j["model"].get<std::string>();
    if (r.model != served_model)
      return ApiError{404, "the model '" + r.model + "' does not exist; this server serves '" + served_model + "'",
                      "invalid_request_error", "model"};
  }
  r.model = served_model;
  if (auto e = refuse_unsupported(j, chat)) return *e;
  if (chat) {
    if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty())
      return bad("'messages' must be a non-empty array", "messages");
    for (const json& m : j["messages"]) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
        return bad("each message needs a string 'role'", "messages");
      const std::string role = m["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant")
        return bad("message role '" + role + "' is not one of system, user, assistant", "messages");
      std::string content;
      if (m.contains("content") && m["content"].is_string()) {
        content = m["content"].get<std::string>();
      } else if (m.contains("content") && m["content"].is_array()) {  // [{"type": "text", "text": ...}]
        for (const json& part : m["content"]) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string())
            return bad("only text content parts are supported", "messages");
          content += part["text"].get<std::string>();
        }
      } else {
        return bad("each message needs a string 'content'", "messages");
      }
      r.messages.push_back({role, content});
    }
  } else {
    if (!j.contains("prompt")) return bad("'prompt' is required", "prompt");
    const json& p = j["prompt"];
    if (p.is_string()) {
      r.prompt = p.get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.prompt = p[0].get<std::string>();
    } else {
      return bad("'prompt' must be a string (one prompt per request)", "prompt");
    }
    if (r.prompt.empty()) return bad("'prompt' is empty", "prompt");
    if (j.contains("echo") && !j["echo"].is_null()) {
      if (!j["echo"].is_boolean()) return bad("'echo' must be a boolean", "echo");
      r.echo = j["echo"].get<bool>();
    }
  }
  const char* max_key = chat && j.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (auto e = number<int>(j, max_key, 0, 1 << 20, r.max_tokens)) return *e;
  if (auto e = number<float>(j, "temperature", 0.f, 2.f, r.sampling.temperature)) return *e;
  if (auto e = number<float>(j, "top_p", 0.f, 1.f, r.sampling.top_p)) return *e;
  if (r.sampling.top_p <= 0.f) return bad("'top_p' must be > 0", "top_p");
  if (auto e = number<int>(j, "top_k", 0, 1 << 20, r.sampling.top_k)) return *e;
  int64_t seed = 0;
  if (auto e = number<int64_t>(j, "seed", INT64_MIN, INT64_MAX, seed)) return *e;
  r.sampling.seed = uint64_t(seed);
  int n = 1;
  if (auto e = number<int>(j, "n", 1, 1 << 20, n)) return *e;
  if (n != 1) return bad("only n = 1 is supported", "n");
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array() && s.size() <= 4) {
      for (const json& x : s) {
        if (!x.is_string()) return bad("'stop' entries must be strings", "stop");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      return bad("'stop' must be a string or an array of up to 4 strings", "stop");
    }
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) return bad("'stream' must be a boolean", "stream");
    r.stream = j["stream"].get<bool>();
  }
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    const json& so = j["stream_options"];
    if (!so.is_object()) return bad("'stream_options' must be an object", "stream_options");
    bool continuous = false;
    for (auto [key, field] : {std::pair{"include_usage", &r.include_usage},
                              std::pair{"continuous_usage_stats", &continuous}}) {
      if (!so.contains(key) || so[key].is_null()) continue;
      if (!so[key].is_boolean()) return bad(std::string("'stream_options.") + key + "' must be a boolean", "stream_options");
      *field = so[key].get<bool>();
    }
    r.continuous_usage = continuous && r.include_usage;
  }
  return r;
}

ChatPrompt apply_chat_template(const std::vector<ChatMessage>& messages, const Tokenizer& tok) {
  ChatPrompt p;
  if (tok.token_to_id("<|start_header_id|>") && tok.token_to_id("<|eot_id|>")) {  // Llama-3 instruct
    for (const ChatMessage& m : messages)
      p.text += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
    p.text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
    p.stop = {"<|eot_id|>"};
    return p;
  }
  for (const ChatMessage& m : messages) p.text += m.role + ": " + m.content + "\n\n";
  p.text += "assistant:";
  p.stop = {"\n\nuser:", "\n\nsystem:"};
  return p;
}

std::string to_wire(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json usage_json(int prompt_tokens, int completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

json completion_response(const std::string& id, long created, const std::string& model, const std::string& text,
                         const std::string& finish_reason, int prompt_tokens, int completion_tokens, bool chat) {
  json choice = {{"index", 0}, {"finish_reason", finish_reason}};
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
    choice["logprobs"] = nullptr;
  }
  return {{"id", id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})},
          {"usage", usage_json(prompt_tokens, completion_tokens)}};
}

json stream_chunk(const std::string& id, long created, const std::string& model, const std::string& text,
                  const std::optional<std::string>& finish_reason, bool chat, bool first) {
  json choice = {{"index", 0}, {"finish_reason", finish_reason ? json(*finish_reason) : json(nullptr)}};
  if (chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || (first && !finish_reason)) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
    choice["logprobs"] = nullptr;
  }
  return {{"id", id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})}};
}

}  // namespace spear::serve
