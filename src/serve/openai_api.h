#pragma once
// The OpenAI-compatible request and response formats of `spear serve`: parsing with validation (every problem
// becomes an ApiError with the HTTP status and the OpenAI error envelope), the chat template, and the JSON of
// completions, chat completions and their streamed chunks.
#include <optional>
#include <variant>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine.h"
#include "tokenizer/tokenizer.h"

namespace spear::serve {

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field, when there is one
  nlohmann::json body() const;  // {"error": {"message", "type", "param", "code"}}
};

struct ChatMessage {
  std::string role, content;
};

// One parsed /v1/completions or /v1/chat/completions request.
struct GenerationRequest {
  bool chat = false;
  std::string model;
  std::string prompt;                 // completions
  std::vector<ChatMessage> messages;  // chat
  int max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage
  // stream_options.continuous_usage_stats (vLLM's extension; with include_usage): the usage so far in every chunk,
  // so a client can tell how many tokens a chunk carries.
  bool continuous_usage = false;
  bool echo = false;           // completions: the prompt in front of the text
};

// Parses and validates a request body (chat = the chat endpoint). served_model: the one model name accepted
// (requests may also leave "model" out). Returns the request or the error to send.
std::variant<GenerationRequest, ApiError> parse_request(const std::string& body, bool chat,
                                                        const std::string& served_model);

// The chat template: Llama-3's header tokens when the tokenizer has them, otherwise the documented default
// ("<role>: <content>" blocks separated by blank lines, then "assistant:"). Returns the prompt text (the
// tokenizer adds BOS) and the stop strings the format needs.
struct ChatPrompt {
  std::string text;
  std::vector<std::string> stop;
};
ChatPrompt apply_chat_template(const std::vector<ChatMessage>& messages, const Tokenizer& tok);

// Response objects. created: unix seconds; id: "cmpl-…" / "chatcmpl-…".
nlohmann::json completion_response(const std::string& id, long created, const std::string& model,
                                   const std::string& text, const std::string& finish_reason, int prompt_tokens,
                                   int completion_tokens, bool chat);
nlohmann::json stream_chunk(const std::string& id, long created, const std::string& model, const std::string& text,
                            const std::optional<std::string>& finish_reason, bool chat, bool first);
nlohmann::json usage_json(int prompt_tokens, int completion_tokens);

// JSON text for the wire: bytes that are not valid UTF-8 (a model can emit a lone byte of a multi-byte
// character, a client can send one) become U+FFFD instead of an exception.
std::string to_wire(const nlohmann::json& j);

}  // namespace spear::serve
