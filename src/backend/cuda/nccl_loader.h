#pragma once
// NCCL, loaded at run time (dlopen) rather than linked: a single-GPU build and a machine without NCCL keep
// working, and a machine whose NCCL comes from a pip package (nvidia-nccl-cu*) needs only its libnccl.so.2.
// nccl.h is included for its types alone; every call goes through the pointers below.
#include <string>

#include <nccl.h>

#include "core/error.h"

namespace spear::cuda {

struct NcclApi {
  std::string path;  // the library that was loaded
  int version = 0;   // ncclGetVersion: major * 10000 + minor * 100 + patch (2.9 and later)
  decltype(&::ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&::ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&::ncclCommDestroy) comm_destroy = nullptr;
  decltype(&::ncclAllReduce) all_reduce = nullptr;
  decltype(&::ncclAllGather) all_gather = nullptr;
  decltype(&::ncclGroupStart) group_start = nullptr;
  decltype(&::ncclGroupEnd) group_end = nullptr;
  decltype(&::ncclGetErrorString) get_error_string = nullptr;
  decltype(&::ncclGetVersion) get_version = nullptr;
  // Optional (NCCL 2.13+): the detail behind an error code, e.g. which ranks share a GPU; null when absent.
  decltype(&::ncclGetLastError) get_last_error = nullptr;
};

// The loaded library: $SPEAR_NCCL_LIBRARY if set, else libnccl.so.2, else libnccl.so. Loaded once per process
// (thread-safe) and never unloaded; throws spear::Error saying how to provide it when none can be loaded.
const NcclApi& nccl();
// Whether nccl() would succeed (never throws); `why` receives the reason when not.
bool nccl_available(std::string* why = nullptr);
// "<error string>[: <last error detail>]" for a failed NCCL call.
std::string nccl_error_message(int result);

#define SPEAR_NCCL_CHECK(expr)                                                \
  do {                                                                        \
    const ncclResult_t nccl_st_ = (expr);                                     \
    if (nccl_st_ != ncclSuccess)                                              \
      ::spear::fail("NCCL error at {}:{}: {} ({})", __FILE__, __LINE__,       \
                    ::spear::cuda::nccl_error_message(int(nccl_st_)), #expr); \
  } while (0)

}  // namespace spear::cuda
