// The spear command line as a user runs it: JSON outputs, exit codes, and error messages for bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace spear {

namespace {
struct CmdResult {
  int code;
  std::string out;  // stdout and stderr
};

CmdResult run(const std::string& args) {
  std::string cmd = std::string("SPEAR_PROGRESS=0 ") + SPEAR_BINARY + " " + args + " 2>&1";
  CmdResult r{-1, {}};
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

nlohmann::json golden() {
  std::ifstream in(test::ref_model_dir() + "/golden.json");
  return nlohmann::json::parse(in);
}
const std::string kModel = "--model " + test::ref_model_dir();
}  // namespace

TEST(Cli, HelpForEverySubcommand) {
  for (const char* sub : {"", "ppl", "generate", "tokenize", "inspect"}) {
    CmdResult r = run(std::string(sub) + " --help");
    EXPECT_EQ(r.code, 0) << sub;
    EXPECT_NE(r.out.find("--"), std::string::npos) << sub;
  }
  CmdResult r = run("ppl --help");
  for (const char* opt : {"--model", "--data", "--ctx", "--max-windows", "--json", "--threads"})
    EXPECT_NE(r.out.find(opt), std::string::npos) << opt;
}

TEST(Cli, TokenizeJson) {
  CmdResult r = run("tokenize " + kModel + " --json --text 'Hello world'");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["ids"], (std::vector<int>{0, 7362, 547, 1600}));
}

TEST(Cli, GenerateGreedyJson) {
  CmdResult r = run("generate " + kModel + " --prompt 'The meaning of' --max-tokens 32 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  auto all = golden()["greedy"]["ids"].get<std::vector<int>>();
  EXPECT_EQ(j["prompt_ids"], std::vector<int>(all.begin(), all.begin() + 4));
  EXPECT_EQ(j["output_ids"], std::vector<int>(all.begin() + 4, all.end()));
  EXPECT_EQ(j["text"].get<std::string>(), golden()["greedy"]["text"].get<std::string>().substr(14));
}

TEST(Cli, GenerateMarginsJson) {
  CmdResult r = run("generate " + kModel + " --prompt 'The meaning of' --max-tokens 8 --margins --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  auto all = golden()["greedy"]["ids"].get<std::vector<int>>();
  EXPECT_EQ(j["output_ids"], std::vector<int>(all.begin() + 4, all.begin() + 12));
  ASSERT_EQ(j["margins"].size(), 8u);
  for (const auto& m : j["margins"]) EXPECT_GT(m.get<double>(), 0.0);
  CmdResult bad = run("generate " + kModel + " --prompt 'x' --margins --temperature 0.5");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("greedy"), std::string::npos) << bad.out;
}

TEST(Cli, GenerateSampledIsSeeded) {
  std::string args =
      "generate " + kModel + " --prompt 'Once' --max-tokens 12 --temperature 0.9 --top-k 40 --top-p 0.95 --json";
  CmdResult a = run(args + " --seed 7"), b = run(args + " --seed 7");
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_EQ(nlohmann::json::parse(a.out)["output_ids"], nlohmann::json::parse(b.out)["output_ids"]);
}

TEST(Cli, PplJsonKeys) {
  std::string data = test::scratch_dir("cli_ppl") + "/t.txt";
  std::ofstream(data) << golden()["prompt"].get<std::string>() << golden()["prompt"].get<std::string>();
  CmdResult r = run("ppl " + kModel + " --data " + data + " --ctx 64 --max-windows 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["windows"], 2);
  EXPECT_EQ(j["tokens_scored"], 126);
  EXPECT_GT(j["ppl"].get<double>(), 1.0);
  EXPECT_LT(j["ppl"].get<double>(), 200.0);
}

TEST(Cli, InspectJson) {
  CmdResult r = run("inspect " + kModel + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["parameters"], 23075328);
  EXPECT_EQ(j["files"], 4);
}

TEST(Cli, BadInputIsAClearError) {
  CmdResult r = run("ppl --model /nonexistent --data /etc/hostname");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("nonexistent"), std::string::npos) << r.out;
  std::string dir = test::scratch_dir("cli_bad");
  r = run("inspect --model " + dir);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("spear: error: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no config.json"), std::string::npos) << r.out;
  r = run("generate " + kModel + " --prompt x --top-p 0");
  EXPECT_NE(r.code, 0);
  r = run("ppl " + kModel + " --data /etc/hostname");  // shorter than one window
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("fewer than one window"), std::string::npos) << r.out;
  r = run("bogus-subcommand");
  EXPECT_NE(r.code, 0);
}

// `spear tune`'s default points straddle every power of two from 8 (the GPU kernels step up right after each),
// and the table it writes is non-decreasing (the fit's promise) and reloads.
TEST(Cli, TuneDefaultPointsStraddlePowersOfTwo) {
  const std::string out = test::scratch_dir("cli_tune") + "/lt.json";
  CmdResult r = run("tune " + kModel + " --max-tokens 40 --reps 1 --max-seqs 2 --out " + out + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_EQ(j["tokens"], std::vector<int>({1, 2, 4, 8, 9, 16, 17, 32, 33, 40}));
  const auto ms = j["ms"].get<std::vector<double>>();
  ASSERT_EQ(ms.size(), 10u);
  for (size_t i = 1; i < ms.size(); ++i) EXPECT_GE(ms[i], ms[i - 1]) << "at " << i;
  std::ifstream in(out);
  EXPECT_EQ(nlohmann::json::parse(in)["tokens"], j["tokens"]);
}

// --tp 2 starts a second process of this binary (one rank each, over TCP): the same greedy tokens and the same
// perplexity as one process, rank 0 alone on stdout; bad splits and rank options are clear errors from every
// rank.
TEST(Cli, TensorParallelRanksMatchOneProcess) {
  const std::string gen = "generate " + kModel + " --prompt 'The meaning of' --max-tokens 32 --json --threads 1";
  CmdResult one = run(gen), two = run(gen + " --tp 2");
  ASSERT_EQ(one.code, 0) << one.out;
  ASSERT_EQ(two.code, 0) << two.out;
  auto a = nlohmann::json::parse(one.out), b = nlohmann::json::parse(two.out);  // one JSON line: rank 0 only
  EXPECT_EQ(b["tp"], 2);
  EXPECT_EQ(a["output_ids"], b["output_ids"]);

  std::string data = test::scratch_dir("cli_tp") + "/t.txt";
  std::ofstream(data) << golden()["prompt"].get<std::string>() << golden()["prompt"].get<std::string>();
  const std::string ppl = "ppl " + kModel + " --data " + data + " --ctx 64 --max-windows 2 --json --threads 1";
  one = run(ppl), two = run(ppl + " --tp 2");
  ASSERT_EQ(two.code, 0) << two.out;
  const double p1 = nlohmann::json::parse(one.out)["ppl"], p2 = nlohmann::json::parse(two.out)["ppl"];
  EXPECT_NEAR(p2 / p1, 1.0, 1e-5);  // fp32 on both; only the order of the sums differs

  CmdResult bad = run(gen + " --tp 3");  // 8 attention heads
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.out.find("8 attention heads do not split over 3"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("spear[rank 2]: error"), std::string::npos) << bad.out;
  bad = run(gen + " --tp 2 --tp-rank 1");
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.out.find("--tp-master"), std::string::npos) << bad.out;
  bad = run(gen + " --tp 2 --tp-reduce bogus");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("--tp-reduce"), std::string::npos) << bad.out;
}

}  // namespace spear
