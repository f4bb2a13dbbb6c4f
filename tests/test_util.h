#pragma once
// Paths the tests use: the bundled demo model, the committed fixtures, and ../shared (golden logits,
// evaluation text) when present.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <unistd.h>

#include <gtest/gtest.h>

#include "core/error.h"

namespace spear::test {

inline std::string source_dir() { return SPEAR_SOURCE_DIR; }
inline std::string shared_dir() { return SPEAR_SHARED_DIR; }
inline std::string ref_model_dir() { return source_dir() + "/models/ref-llama-23m"; }
inline std::string fixture_dir(const std::string& rel) { return source_dir() + "/tests/fixtures/" + rel; }
inline bool have_shared() { return std::filesystem::exists(shared_dir() + "/models/ref-llama-23m/golden_logits.safetensors"); }

// The whole file as bytes ("" when it cannot be read).
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A scratch directory under the build tree, removed and recreated per call.
inline std::string scratch_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("spear_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

#define SPEAR_REQUIRE_SHARED()                                                  \
  do {                                                                          \
    if (!::spear::test::have_shared()) GTEST_SKIP() << "../shared not present"; \
  } while (0)

// Expects `stmt` to throw spear::Error whose message contains `substr`.
#define EXPECT_SPEAR_ERROR(stmt, substr)                                                       \
  do {                                                                                         \
    try {                                                                                      \
      stmt;                                                                                    \
      ADD_FAILURE() << "expected spear::Error containing '" << (substr) << "', nothing thrown"; \
    } catch (const ::spear::Error& e) {                                                        \
      EXPECT_NE(std::string(e.what()).find(substr), std::string::npos) << e.what();            \
    }                                                                                          \
  } while (0)

}  // namespace spear::test
