// `--tp N`: one process per rank (DESIGN.md §5). Without --tp-master the ranks run on this host: this process is rank 0
// and starts ranks 1..N-1 as copies of itself, which find it through SPEAR_TP_* in their environment. With
// --tp-master HOST:PORT and --tp-rank R each rank is started by hand or by a cluster launcher, one per GPU, on any
// host; they meet at rank 0's address over TCP, and NCCL bootstraps from there.
#include <fcntl.h>
#include <omp.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "cli/common.h"
#include "core/error.h"
#include "parallel/process_group.h"

namespace spear::cli {

std::vector<std::string> g_argv;

namespace {
std::unique_ptr<LocalRanks> g_local_ranks;  // waited for at exit, after the command's model is gone

int env_int(const char* name, int dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : dflt;
}
}  // namespace

void add_tp_options(CLI::App* app, CommonOptions& o) {
  app->add_option("--tp", o.tp,
                  "Tensor-parallel ranks: the model's linears split over N "
                  "processes (one GPU each with --device "
                  "cuda; NCCL). Without --tp-master, all N run on this host")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app->add_option("--tp-rank", o.tp_rank, "With --tp-master: this process's rank (0 .. N-1; start one per rank)")
      ->check(CLI::Range(0, 63));
  app->add_option("--tp-master", o.tp_master,
                  "HOST:PORT of rank 0, for ranks on several hosts (rank 0 "
                  "listens there, the others connect)");
  app->add_option("--tp-timeout", o.tp_timeout, "Seconds to wait for every rank to connect")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--tp-reduce", o.tp_reduce,
                  "How the ranks sum their outputs on cuda: auto (p2p where every GPU pair has peer access, else "
                  "nccl), nccl, p2p (the dual-write kernel for tensors that fit its staging, nccl beyond; fails "
                  "without peer access), fused (p2p, plus the fused tail kernel for row-parallel outputs of up to 64 "
                  "tokens: reduce, compensator, residual add and RMSNorm in one launch)")
      ->check(CLI::IsMember({"auto", "nccl", "p2p", "fused"}))
      ->capture_default_str();
}

int tp_rank_of(const CommonOptions& o) { return env_int("SPEAR_TP_RANK", o.tp_rank < 0 ? 0 : o.tp_rank); }

std::shared_ptr<ProcessGroup> start_tensor_parallel(const CommonOptions& o) {
  int size = o.tp, rank = o.tp_rank;
  std::string master = o.tp_master;
  const bool spawned = std::getenv("SPEAR_TP_RANK") != nullptr;  // a rank started by a local rank 0
  if (spawned) {
    rank = env_int("SPEAR_TP_RANK", -1);
    size = env_int("SPEAR_TP_SIZE", 0);
    const char* m = std::getenv("SPEAR_TP_MASTER");
    master = m ? m : "";
  }
  if (size <= 1) {
    if (rank > 0 || !master.empty()) fail("--tp-rank / --tp-master need --tp N with N > 1");
    return nullptr;
  }
  if (!master.empty() && rank < 0) fail("--tp-master: give this process's --tp-rank (0 .. {})", size - 1);
  if (rank >= size) fail("--tp-rank {} is not below --tp {}", rank, size);
  if (master.empty() && rank > 0) fail("--tp-rank {} needs --tp-master HOST:PORT (rank 0's address)", rank);
  // Each rank computes with its share of the cores unless told otherwise.
  if (o.threads == 0 && master.empty())
    omp_set_num_threads(std::max(1, int(std::thread::hardware_concurrency()) / size));

  std::shared_ptr<ProcessGroup> pg;
  if (rank <= 0) {
    int port = 0;
    if (!master.empty()) port = parse_host_port(master, "--tp-master").second;
    pg = ProcessGroup::listen(size, port);
    if (master.empty()) {
      std::vector<std::string> env = {"SPEAR_PROGRESS=0"};
      if (o.threads == 0)
        env.push_back("OMP_NUM_THREADS=" +
                      std::to_string(std::max(1, int(std::thread::hardware_concurrency()) / size)));
      g_local_ranks = std::make_unique<LocalRanks>(size, pg->port(), g_argv, env);
    }
    pg->accept_peers(o.tp_timeout);
  } else {
    auto [host, port] = parse_host_port(master, "--tp-master");
    pg = ProcessGroup::connect(rank, size, host, port, o.tp_timeout);
    if (!spawned) {  // rank 0 reports; a spawned rank's stdout is already discarded
      int fd = ::open("/dev/null", O_WRONLY);
      if (fd >= 0) ::dup2(fd, STDOUT_FILENO), ::close(fd);
    }
  }
  return pg;
}

void finish_tensor_parallel() { g_local_ranks.reset(); }

}  // namespace spear::cli
