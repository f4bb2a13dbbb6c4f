#pragma once
// Errors that reach the user. Every boundary (file, config, request) throws spear::Error with enough
// context to act on: which file, tensor, field. Never abort() on user input.
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace spear {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

#define SPEAR_CHECK(cond, ...)                 \
  do {                                         \
    if (!(cond)) ::spear::fail(__VA_ARGS__);   \
  } while (0)

}  // namespace spear
