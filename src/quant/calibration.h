#pragma once
// Calibration sequences for GPTQ and error-compensator training: windows of a text file, or sequences
// sampled from the full-precision model itself (temperature 1 from BOS), which needs no dataset. Seeded.
#include <cstdint>
#include <string>
#include <vector>

namespace spear {

class Model;
class Tokenizer;

struct CalibrationSet {
  std::vector<std::vector<int32_t>> sequences;  // each of the same length
  std::string source;                           // "file" | "model-samples"
  std::string file;                             // base name of the text file, for "file"
  uint64_t seed = 0;
  std::string hash() const;                     // FNV-1a 64 of all ids, hex
};

// n windows of len tokens at seeded random offsets of the tokenized text (no BOS, as the ppl protocol).
CalibrationSet calibration_from_text(const Tokenizer& tok, const std::string& path, int n, int len, uint64_t seed);
// n sequences of len tokens sampled together (batched decode) from BOS at temperature 1.
CalibrationSet calibration_from_model(Model& model, int32_t bos, int n, int len, uint64_t seed);

// A calibration set saved as JSON ({"source", "file", "seed", "hash", "sequences": [[ids...], ...]}), so
// several runs can share one sampled set; reading validates equal lengths, ids < vocab and the hash.
void save_calibration(const CalibrationSet& c, const std::string& path);
CalibrationSet load_calibration(const std::string& path, int vocab_size);

}  // namespace spear
