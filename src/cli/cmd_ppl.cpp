// spear ppl: perplexity by the protocol of reference.json.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "eval/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_ppl(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto data = std::make_shared<std::string>();
  auto ctx = std::make_shared<int>(512);
  auto max_windows = std::make_shared<int>(0);
  CLI::App* cmd = app.add_subcommand(
      "ppl", "Perplexity of a text file: tokenized whole without BOS, non-overlapping windows of --ctx tokens "
             "(remainder dropped), every token but each window's first scored");
  add_model_option(cmd, *o);
  cmd->add_option("--data,-f", *data, "Text file to evaluate (e.g. ../shared/data/test.txt)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--ctx,-c", *ctx, "Window length in tokens")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-windows", *max_windows, "Evaluate only the first N windows (0 = all)")
      ->check(CLI::NonNegativeNumber);
  add_runtime_options(cmd, *o);
  add_tp_options(cmd, *o);
  add_json_option(cmd, *o);
  cmd->callback([=] {
    auto backend = make_backend(*o);
    Tokenizer tok = Tokenizer::from_dir(o->model_dir);
    auto model = Model::load(o->model_dir, *backend);
    std::string text = read_text_file(*data);
    std::vector<int32_t> ids = tok.encode(text, /*add_special=*/false);
    PerplexityResult r = perplexity(*model, ids, *ctx, *max_windows);
    const double tps = double(r.windows) * r.ctx / r.seconds;
    if (o->json) {
      nlohmann::json j = {{"model", o->model_dir}, {"data", *data},         {"ppl", r.ppl},
                          {"ppl_stderr", r.ppl_stderr}, {"mean_nll", r.mean_nll}, {"tokens_scored", r.tokens_scored},
                          {"windows", r.windows}, {"ctx", r.ctx},           {"text_tokens", r.text_tokens},
                          {"seconds", r.seconds}, {"tokens_per_second", tps}, {"device", backend->name()},
                          {"tp", model->shard().size}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s: %ld tokens, %d windows of %d, %ld scored, %.1f s (%.0f tokens/s)\n", data->c_str(),
                  r.text_tokens, r.windows, r.ctx, r.tokens_scored, r.seconds, tps);
      std::printf("Final estimate: PPL = %.4f +/- %.5f\n", r.ppl, r.ppl_stderr);
    }
  });
}

}  // namespace spear::cli
