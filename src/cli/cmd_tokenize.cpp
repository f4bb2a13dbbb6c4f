// spear tokenize: text to token ids (with the BOS that the post-processor adds).
#include <cstdio>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_tokenize(CLI::App& app) {
  auto o = std::make_shared<CommonOptions>();
  auto text = std::make_shared<std::string>();
  auto no_special = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("tokenize", "Show the token ids (and pieces) of a text");
  add_model_option(cmd, *o);
  cmd->add_option("--text", *text, "Text to tokenize")->required();
  cmd->add_flag("--no-special", *no_special, "Do not apply the post-processor template (no BOS)");
  add_json_option(cmd, *o);
  cmd->callback([=] {
    Tokenizer tok = Tokenizer::from_dir(o->model_dir);
    std::vector<int32_t> ids = tok.encode(*text, !*no_special);
    if (o->json) {
      // A piece can be part of a multi-byte character; invalid UTF-8 is shown as U+FFFD.
      nlohmann::json pieces = nlohmann::json::array();
      for (int32_t id : ids) pieces.push_back(tok.token_bytes(id));
      nlohmann::json j = {{"ids", ids}, {"count", ids.size()}, {"pieces", pieces}};
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::printf("%zu tokens\n", ids.size());
      for (int32_t id : ids) {
        std::string b = tok.token_bytes(id);
        std::string shown;
        for (unsigned char c : b) {
          if (c == '\n') shown += "\\n";
          else if (c == '\t') shown += "\\t";
          else if (c < 0x20) shown += fmt::format("\\x{:02x}", c);
          else shown += char(c);
        }
        std::printf("%8d  '%s'\n", id, shown.c_str());
      }
    }
  });
}

}  // namespace spear::cli
