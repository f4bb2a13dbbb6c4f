// spear generate: prompt in, text out, streamed as it is generated.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "runtime/generator.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_generate(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto prompt = std::make_shared<std::string>();
  auto max_tokens = std::make_shared<int>(64);
  auto sp = std::make_shared<SamplingParams>();
  auto margins = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt (greedy when --temperature is 0)");
  add_model_option(cmd, *o);
  cmd->add_option("--prompt,-p", *prompt, "Prompt text (BOS is added as the tokenizer's template says)")->required();
  cmd->add_option("--max-tokens,-n", *max_tokens, "Maximum number of new tokens")->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--temperature", sp->temperature, "Sampling temperature; 0 = greedy")->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-k", sp->top_k, "Keep the k most likely tokens (0 = off)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", sp->top_p, "Nucleus sampling: keep the smallest set with this probability mass")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", sp->seed, "Random seed for sampling");
  cmd->add_flag("--margins", *margins,
                "Greedy only: report each step's top-1 minus top-2 logit (JSON \"margins\", else on stderr), to tell "
                "a near-tie from a real difference when two runs part; brings the logits to the host (no CUDA graphs)");
  add_runtime_options(cmd, *o);
  add_tp_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    if (sp->top_p <= 0.f) throw CLI::ValidationError("--top-p", "must be > 0");
    if (*margins && sp->temperature > 0.f)
      throw CLI::ValidationError("--margins", "needs greedy decoding (--temperature 0)");
    // Under --tp every rank generates the same tokens (identical logits, same seed); rank 0 reports.
    auto backend = make_backend(*o);
    Tokenizer tok = Tokenizer::from_dir(o->model_dir);
    auto model = Model::load(o->model_dir, *backend);
    std::vector<int32_t> prompt_ids = tok.encode(*prompt, true);
    std::vector<int32_t> out;
    size_t printed = 0;
    if (!o->json) {
      std::fputs(prompt->c_str(), stdout);
      std::fflush(stdout);
    }
    auto on_token = [&](int32_t t) {
      out.push_back(t);
      if (!o->json) {  // print only whole UTF-8 characters as they complete
        std::string text = tok.decode(out, /*skip_special=*/true);
        size_t complete = utf8_complete_prefix(text);
        if (complete > printed) {
          std::fwrite(text.data() + printed, 1, complete - printed, stdout);
          std::fflush(stdout);
          printed = complete;
        }
      }
      return true;
    };
    GenerateResult r = generate(*model, prompt_ids, *max_tokens, *sp, tok.eos_ids(), on_token, *margins);
    std::string text = tok.decode(r.output_ids, true);
    const double decode_tps = r.output_ids.size() > 1 ? double(r.output_ids.size() - 1) / r.decode_seconds : 0.0;
    if (o->json) {
      nlohmann::json j = {{"prompt", *prompt},
                          {"prompt_ids", prompt_ids},
                          {"output_ids", r.output_ids},
                          {"text", text},
                          {"finish_reason", r.finish_reason},
                          {"prefill_seconds", r.prefill_seconds},
                          {"decode_seconds", r.decode_seconds},
                          {"decode_tokens_per_second", decode_tps},
                          {"tp", model->shard().size}};
      if (*margins) j["margins"] = r.margins;
      // A model may stop inside a multi-byte character (or emit invalid byte tokens): U+FFFD, not an exception.
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else if (model->shard().rank == 0) {
      if (printed < text.size()) std::fwrite(text.data() + printed, 1, text.size() - printed, stdout);
      std::printf("\n");
      std::fflush(stdout);  // keep the summary on stderr after the text when both go to one terminal
      std::fprintf(stderr, "[%zu prompt tokens, %zu new, prefill %.1f ms, decode %.1f tokens/s, finish: %s]\n",
                   prompt_ids.size(), r.output_ids.size(), r.prefill_seconds * 1e3, decode_tps,
                   r.finish_reason.c_str());
      if (*margins) {
        float low = r.margins.empty() ? 0.f : r.margins[0];
        size_t at = 0;
        for (size_t i = 0; i < r.margins.size(); ++i)
          if (r.margins[i] < low) low = r.margins[i], at = i;
        std::fprintf(stderr, "[logit margins: smallest %.4f at new token %zu]\n", double(low), at);
      }
    }
  });
}

}  // namespace spear::cli
