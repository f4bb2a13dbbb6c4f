#include "core/progress.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <unistd.h>

namespace spear {

ProgressBar::ProgressBar(std::string label, long total)
    : label_(std::move(label)), total_(total), start_(std::chrono::steady_clock::now()), last_draw_() {
  const char* env = std::getenv("SPEAR_PROGRESS");
  enabled_ = isatty(STDERR_FILENO) && !(env && std::strcmp(env, "0") == 0) && total_ > 0;
}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(long done, const std::string& suffix) {
  if (!enabled_ || finished_) return;
  auto now = std::chrono::steady_clock::now();
  if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double secs = std::chrono::duration<double>(now - start_).count();
  const double frac = double(done) / double(total_);
  constexpr int kWidth = 30;
  int filled = int(frac * kWidth);
  char bar[kWidth + 1];
  for (int i = 0; i < kWidth; ++i) bar[i] = i < filled ? '#' : '.';
  bar[kWidth] = 0;
  double eta = done > 0 ? secs * (double(total_ - done) / double(done)) : 0.0;
  std::fprintf(stderr, "\r%s [%s] %ld/%ld %5.1fs eta %5.1fs %s\x1b[K", label_.c_str(), bar, done, total_, secs, eta,
               suffix.c_str());
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  std::fprintf(stderr, "\r\x1b[K");
  std::fflush(stderr);
}

}  // namespace spear
