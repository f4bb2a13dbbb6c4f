#include "quant/calibration.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/progress.h"
#include "model/model.h"
#include "quant/package.h"
#include "runtime/sampler.h"
#include "tokenizer/tokenizer.h"

namespace spear {

std::string CalibrationSet::hash() const {
  uint64_t h = fnv1a64(nullptr, 0);
  for (const auto& s : sequences) h = fnv1a64(s.data(), s.size() * sizeof(int32_t), h);
  return fmt::format("{:016x}", h);
}

CalibrationSet calibration_from_text(const Tokenizer& tok, const std::string& path, int n, int len, uint64_t seed) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open calibration file {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<int32_t> ids = tok.encode(ss.str(), false);
  if (int64_t(ids.size()) < int64_t(len) + 1)
    fail("calibration file {} has {} tokens, fewer than one sequence of {}", path, ids.size(), len);
  CalibrationSet c;
  c.source = "file";
  c.file = std::filesystem::path(path).filename().string();
  c.seed = seed;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> start(0, ids.size() - size_t(len));
  for (int i = 0; i < n; ++i) {
    size_t s = start(rng);
    c.sequences.emplace_back(ids.begin() + s, ids.begin() + s + len);
  }
  return c;
}

CalibrationSet calibration_from_model(Model& model, int32_t bos, int n, int len, uint64_t seed) {
  if (n <= 0 || len < 2) fail("calibration needs at least one sequence of 2 tokens");
  if (len > model.config().max_position_embeddings)
    fail("calibration length {} exceeds the model context {}", len, model.config().max_position_embeddings);
  CalibrationSet c;
  c.source = "model-samples";
  c.seed = seed;
  c.sequences.assign(size_t(n), std::vector<int32_t>{bos});
  std::vector<Sampler> samplers;
  for (int i = 0; i < n; ++i) {
    SamplingParams p;
    p.temperature = 1.f;
    p.seed = seed * 1000003ull + uint64_t(i);
    samplers.emplace_back(p);
  }
  auto cache = model.make_kv_cache(n, len);
  const int V = model.config().vocab_size;
  ProgressBar bar("sampling calibration data", len - 1);
  for (int pos = 0; pos < len - 1; ++pos) {
    // All n sequences advance one token per step: one batched forward of n tokens.
    Batch b;
    for (int i = 0; i < n; ++i) {
      b.tokens.push_back(c.sequences[size_t(i)].back());
      b.seqs.push_back({i, 1, pos, i});
    }
    std::vector<float> logits = model.forward(b, *cache, LogitsMode::LastPerSeq);
    for (int i = 0; i < n; ++i)
      c.sequences[size_t(i)].push_back(samplers[size_t(i)].sample(std::span<const float>(logits.data() + size_t(i) * V, size_t(V))));
    bar.update(pos + 1);
  }
  bar.finish();
  return c;
}

void save_calibration(const CalibrationSet& c, const std::string& path) {
  nlohmann::json j = {{"source", c.source}, {"file", c.file}, {"seed", c.seed}, {"hash", c.hash()}, {"sequences", c.sequences}};
  std::ofstream out(path);
  if (!out) fail("cannot write {}", path);
  out << j.dump() << "\n";
}

CalibrationSet load_calibration(const std::string& path, int vocab_size) {
  std::ifstream in(path);
  if (!in) fail("cannot open calibration ids {}", path);
  CalibrationSet c;
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    c.source = j.at("source").get<std::string>();
    c.file = j.value("file", "");
    c.seed = j.at("seed").get<uint64_t>();
    c.sequences = j.at("sequences").get<std::vector<std::vector<int32_t>>>();
    if (c.sequences.empty()) fail("{}: no sequences", path);
    for (const auto& s : c.sequences) {
      if (s.size() != c.sequences[0].size() || s.size() < 2) fail("{}: sequences must have one length of at least 2", path);
      for (int32_t id : s)
        if (id < 0 || id >= vocab_size) fail("{}: token id {} outside the vocabulary [0, {})", path, id, vocab_size);
    }
    if (j.at("hash").get<std::string>() != c.hash()) fail("{}: the ids do not match the stored hash (corrupt file?)", path);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed calibration ids: {}", path, e.what());
  }
  return c;
}

}  // namespace spear
