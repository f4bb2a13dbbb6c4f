#include "backend/cuda/nccl_loader.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#include <dlfcn.h>

#include <fmt/format.h>

namespace spear::cuda {

namespace {

struct Loaded {
  NcclApi api;
  std::string error;  // empty when loaded
};

template <typename Fn>
bool resolve(void* lib, const char* symbol, Fn& fn, std::string& error) {
  dlerror();
  fn = reinterpret_cast<Fn>(dlsym(lib, symbol));
  if (fn) return true;
  const char* e = dlerror();
  error = fmt::format("{} has no symbol {}{}{}", error, symbol, e ? ": " : "", e ? e : "");
  return false;
}

Loaded load() {
  Loaded out;
  std::vector<std::string> candidates;
  const char* env = std::getenv("SPEAR_NCCL_LIBRARY");
  const bool from_env = env && *env;
  if (from_env) candidates.emplace_back(env);
  candidates.emplace_back("libnccl.so.2");
  candidates.emplace_back("libnccl.so");
  void* lib = nullptr;
  std::string tried;  // every candidate's dlerror: a wrong SPEAR_NCCL_LIBRARY must not hide behind the fallbacks
  for (const std::string& c : candidates) {
    // RTLD_LOCAL: NCCL's symbols stay out of the global namespace (a second NCCL loaded by PyTorch or a plugin
    // must not bind to ours).
    lib = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib) {
      out.api.path = c;
      break;
    }
    const char* e = dlerror();
    tried += fmt::format("{}{}", tried.empty() ? "" : "; ", e ? e : c + ": unknown error");
  }
  if (lib && from_env && out.api.path != env)  // a SPEAR_NCCL_LIBRARY that failed must not pass unnoticed
    std::fprintf(stderr, "warning: SPEAR_NCCL_LIBRARY: %s; using %s instead\n", tried.c_str(), out.api.path.c_str());
  if (!lib) {
    out.error = fmt::format(
        "tensor parallelism on CUDA needs NCCL: could not load libnccl.so.2 (set SPEAR_NCCL_LIBRARY or "
        "LD_LIBRARY_PATH): {}",
        tried);
    return out;
  }
  NcclApi& a = out.api;
  std::string missing = "NCCL library " + a.path;
  const bool ok = resolve(lib, "ncclGetUniqueId", a.get_unique_id, missing) &&
                  resolve(lib, "ncclCommInitRank", a.comm_init_rank, missing) &&
                  resolve(lib, "ncclCommDestroy", a.comm_destroy, missing) &&
                  resolve(lib, "ncclAllReduce", a.all_reduce, missing) &&
                  resolve(lib, "ncclAllGather", a.all_gather, missing) &&
                  resolve(lib, "ncclGroupStart", a.group_start, missing) &&
                  resolve(lib, "ncclGroupEnd", a.group_end, missing) &&
                  resolve(lib, "ncclGetErrorString", a.get_error_string, missing) &&
                  resolve(lib, "ncclGetVersion", a.get_version, missing);
  if (!ok) {
    out.error = "tensor parallelism on CUDA needs NCCL: " + missing;
    return out;
  }
  std::string ignored;
  resolve(lib, "ncclGetLastError", a.get_last_error, ignored);  // optional
  if (a.get_version(&a.version) != ncclSuccess) a.version = 0;
  // ncclBfloat16 (the activations' dtype) came with NCCL 2.10.
  if (a.version < 21000)
    out.error = fmt::format("tensor parallelism on CUDA needs NCCL 2.10 or later (bf16 all-reduce); {} is version {}",
                            a.path, a.version);
  // The handle stays open for the process's lifetime: communicators may be destroyed during static teardown.
  return out;
}

const Loaded& loaded() {
  static const Loaded l = load();
  return l;
}

}  // namespace

const NcclApi& nccl() {
  const Loaded& l = loaded();
  if (!l.error.empty()) fail("{}", l.error);
  return l.api;
}

bool nccl_available(std::string* why) {
  const Loaded& l = loaded();
  if (why) *why = l.error;
  return l.error.empty();
}

std::string nccl_error_message(int result) {
  const Loaded& l = loaded();
  if (!l.api.get_error_string) return fmt::format("NCCL result {}", result);
  std::string msg = l.api.get_error_string(ncclResult_t(result));
  // The last error is per thread and names the cause (a duplicate GPU, a peer that went away).
  if (l.api.get_last_error) {
    const char* detail = l.api.get_last_error(nullptr);
    if (detail && *detail) msg += fmt::format(": {}", detail);
  }
  return msg;
}

}  // namespace spear::cuda
