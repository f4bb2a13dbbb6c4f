#pragma once
// A terminal progress bar on stderr for long work (loading, perplexity, quantization, calibration).
// Draws only when stderr is a terminal, so logs and JSON output stay clean; SPEAR_PROGRESS=0 silences it.
#include <chrono>
#include <string>

namespace spear {

class ProgressBar {
 public:
  ProgressBar(std::string label, long total);
  ~ProgressBar();
  void update(long done, const std::string& suffix = "");
  void finish();

 private:
  std::string label_;
  long total_;
  bool enabled_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace spear
