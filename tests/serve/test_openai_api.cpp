// Request parsing and validation of the OpenAI-compatible API, and the chat template.
#include <gtest/gtest.h>

#include "serve/openai_api.h"
#include "test_util.h"

namespace spear::serve {

namespace {

ApiError error_of(const std::string& body, bool chat = false) {
  auto r = parse_request(body, chat, "m");
  EXPECT_TRUE(std::holds_alternative<ApiError>(r)) << body;
  return std::holds_alternative<ApiError>(r) ? std::get<ApiError>(r) : ApiError{};
}

}  // namespace

TEST(OpenAiApi, ParsesCompletionFields) {
  auto r = parse_request(
      R"({"model":"m","prompt":"hi","max_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":4,"seed":3,)"
      R"("stop":["a","b"],"stream":true,"stream_options":{"include_usage":true},"echo":true})",
      false, "m");
  ASSERT_TRUE(std::holds_alternative<GenerationRequest>(r));
  const auto& g = std::get<GenerationRequest>(r);
  EXPECT_EQ(g.prompt, "hi");
  EXPECT_EQ(g.max_tokens, 7);
  EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(g.sampling.top_p, 0.9f);
  EXPECT_EQ(g.sampling.top_k, 4);
  EXPECT_EQ(g.sampling.seed, 3u);
  EXPECT_EQ(g.stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(g.stream && g.include_usage && g.echo);
  EXPECT_FALSE(g.continuous_usage);
  auto c = parse_request(R"({"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]})", true, "m");
  ASSERT_TRUE(std::holds_alternative<GenerationRequest>(c));
  EXPECT_EQ(std::get<GenerationRequest>(c).messages[0].content, "x");
}

// vLLM's stream_options.continuous_usage_stats: the usage in every chunk, only together with include_usage.
TEST(OpenAiApi, StreamOptions) {
  auto parsed = [](const std::string& so) {
    auto r = parse_request(R"({"prompt":"hi","stream":true,"stream_options":)" + so + "}", false, "m");
    EXPECT_TRUE(std::holds_alternative<GenerationRequest>(r)) << so;
    return std::holds_alternative<GenerationRequest>(r) ? std::get<GenerationRequest>(r) : GenerationRequest{};
  };
  auto g = parsed(R"({"include_usage":true,"continuous_usage_stats":true})");
  EXPECT_TRUE(g.include_usage && g.continuous_usage);
  g = parsed(R"({"continuous_usage_stats":true})");
  EXPECT_FALSE(g.include_usage || g.continuous_usage);
  g = parsed(R"({"include_usage":null})");
  EXPECT_FALSE(g.include_usage);
  EXPECT_FALSE(parsed("null").include_usage);
  for (const char* bad : {R"("yes")", "[true]", R"({"include_usage":"yes"})", R"({"continuous_usage_stats":1})"}) {
    auto r = parse_request(std::string(R"({"prompt":"hi","stream_options":)") + bad + "}", false, "m");
    ASSERT_TRUE(std::holds_alternative<ApiError>(r)) << bad;
    EXPECT_EQ(std::get<ApiError>(r).status, 400) << bad;
    EXPECT_EQ(std::get<ApiError>(r).param, "stream_options") << bad;
  }
}

TEST(OpenAiApi, RejectsBadRequestsWithStatusAndParam) {
  EXPECT_EQ(error_of("{bad").status, 400);
  EXPECT_EQ(error_of("[1]").status, 400);
  EXPECT_EQ(error_of(R"({"prompt":"x","max_tokens":"a"})").param, "max_tokens");
  EXPECT_EQ(error_of(R"({"prompt":"x","max_tokens":-1})").param, "max_tokens");
  EXPECT_EQ(error_of(R"({"prompt":"x","max_tokens":1.5})").param, "max_tokens");
  EXPECT_EQ(error_of(R"({"prompt":"x","max_tokens":99999999999})").param, "max_tokens");
  EXPECT_EQ(error_of(R"({"prompt":"x","temperature":3})").param, "temperature");
  EXPECT_EQ(error_of(R"({"prompt":"x","top_p":0})").param, "top_p");
  EXPECT_EQ(error_of(R"({"prompt":"x","n":2})").param, "n");
  EXPECT_EQ(error_of(R"({"prompt":"x","stop":[1]})").param, "stop");
  EXPECT_EQ(error_of(R"({"prompt":"x","stream":"yes"})").param, "stream");
  EXPECT_EQ(error_of(R"({"prompt":""})").param, "prompt");
  EXPECT_EQ(error_of(R"({"prompt":["a","b"]})").param, "prompt");
  EXPECT_EQ(error_of(R"({"max_tokens":3})").param, "prompt");
  ApiError unknown = error_of(R"({"model":"other","prompt":"x"})");
  EXPECT_EQ(unknown.status, 404);
  EXPECT_EQ(unknown.param, "model");
  EXPECT_EQ(error_of(R"({"messages":[]})", true).param, "messages");
  EXPECT_EQ(error_of(R"({"messages":[{"role":"tool","content":"x"}]})", true).param, "messages");
  EXPECT_EQ(error_of(R"({"messages":[{"role":"user"}]})", true).param, "messages");
  // Options the server cannot honour are refused by name, not answered without them; asking for nothing passes.
  EXPECT_EQ(error_of(R"({"prompt":"x","logprobs":5})").param, "logprobs");
  EXPECT_EQ(error_of(R"({"prompt":"x","best_of":3})").param, "best_of");
  EXPECT_EQ(error_of(R"({"prompt":"x","suffix":"end"})").param, "suffix");
  EXPECT_EQ(error_of(R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})", true).param, "logprobs");
  EXPECT_EQ(error_of(R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", true).param, "top_logprobs");
  EXPECT_EQ(error_of(R"({"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]})", true).param,
            "tools");
  EXPECT_EQ(
      error_of(R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})", true).param,
      "response_format");
  for (const char* ok : {R"({"prompt":"x","logprobs":null,"best_of":1,"suffix":null,"echo":false})",
                         R"({"prompt":"x","logprobs":0})"})
    EXPECT_TRUE(std::holds_alternative<GenerationRequest>(parse_request(ok, false, "m"))) << ok;
  for (const char* ok : {R"({"messages":[{"role":"user","content":"x"}],"logprobs":false,"tools":[],)"
                         R"("tool_choice":"none","response_format":{"type":"text"}})"})
    EXPECT_TRUE(std::holds_alternative<GenerationRequest>(parse_request(ok, true, "m"))) << ok;
  const auto body = error_of("{bad").body();
  EXPECT_TRUE(body["error"]["message"].is_string());
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
}

TEST(OpenAiApi, ChatTemplateDefaultAndLlama3) {
  const Tokenizer tok = Tokenizer::from_dir(test::ref_model_dir());
  const ChatPrompt p = apply_chat_template({{"system", "Be brief."}, {"user", "Hi"}}, tok);
  if (tok.token_to_id("<|start_header_id|>")) {
    EXPECT_NE(p.text.find("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"), std::string::npos);
  } else {
    EXPECT_EQ(p.text, "system: Be brief.\n\nuser: Hi\n\nassistant:");
    EXPECT_FALSE(p.stop.empty());
  }
}

}  // namespace spear::serve
