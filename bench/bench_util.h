#pragma once
// Helpers shared by the benchmark programs.
#include <cstdio>
#include <string>

namespace spear::bench {

// stdout of a shell command, trailing whitespace removed ("" when it fails); for the commit and device name.
inline std::string shell(const char* cmd) {
  std::string out;
  if (FILE* p = popen(cmd, "r")) {
    char buf[256];
    while (fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

}  // namespace spear::bench
