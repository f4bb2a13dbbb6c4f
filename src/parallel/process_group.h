#pragma once
// The ranks of one tensor-parallel model (DESIGN.md §5), bootstrapped over TCP so that the same code runs on
// one host or across hosts: rank 0 listens, every other rank connects to it. These sockets carry the small
// control traffic (the NCCL unique id, the serving leader's commands to its workers) and, on the CPU backend,
// the all-reduce itself: a star through rank 0 that sums in rank order, so every rank gets bit-identical
// values. GPU backends reduce over NCCL (or their own peer-to-peer path) and use the group only to bootstrap.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace spear {

class ProcessGroup {
 public:
  // Rank 0's side, in two steps so that a launcher can learn the port before it starts the other ranks:
  // listen binds `port` on all interfaces (0: an ephemeral one, see port()); accept_peers then waits for the
  // size - 1 others (each says its rank) for up to timeout_s seconds.
  static std::unique_ptr<ProcessGroup> listen(int size, int port);
  void accept_peers(double timeout_s);
  // Rank r > 0: connects to rank 0 at host:port, retrying until timeout_s (rank 0 may start later).
  static std::unique_ptr<ProcessGroup> connect(int rank, int size, const std::string& host, int port,
                                               double timeout_s);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int port() const { return port_; }

  // Rank 0 sends `bytes`, every other rank receives them (any length; the receivers' contents are replaced).
  void broadcast(std::string& bytes);
  void broadcast(void* data, size_t n);  // the same length on every rank
  // x[0..n) becomes the sum over ranks (x_0 + x_1 + ... in rank order), identical on every rank.
  void all_reduce_sum(float* x, size_t n);
  // all[r·n .. (r + 1)·n) becomes rank r's `mine` (n bytes, the same n on every rank) on every rank: the peers
  // send theirs to rank 0, which assembles them in rank order and sends the whole back. `mine` may point into
  // `all` (at this rank's slot). For small records (the GPU backends' buffer handles), not bulk data.
  void all_gather(const void* mine, size_t n, void* all);
  void barrier();

  // Every failure (a peer that closed its connection, a timeout, a mismatched handshake) throws spear::Error
  // naming the peer rank.
 private:
  ProcessGroup(int rank, int size) : rank_(rank), size_(size) {}
  // more: another send follows at once (MSG_MORE), so a header and its payload leave in one segment.
  void send_all(int peer, const void* data, size_t n, bool more = false);
  void recv_all(int peer, void* data, size_t n);
  int rank_ = 0, size_ = 1, port_ = 0;
  int listen_fd_ = -1;
  std::vector<int> fds_;  // rank 0: fds_[r] is the socket to rank r (fds_[0] unused); others: fds_[0] to rank 0
  std::vector<float> scratch_;
};

// "host:port" -> {host, port}; throws spear::Error naming `what` on a malformed address.
std::pair<std::string, int> parse_host_port(const std::string& s, const std::string& what);

// Starts ranks 1..size-1 of a group on this host: the running program again (/proc/self/exe) with the same
// arguments and SPEAR_TP_RANK / SPEAR_TP_SIZE / SPEAR_TP_MASTER=127.0.0.1:port in its environment, standard
// output discarded (rank 0 reports), standard error kept. The returned object waits for them when destroyed
// and kills those still running after a grace period.
class LocalRanks {
 public:
  LocalRanks(int size, int port, const std::vector<std::string>& argv, const std::vector<std::string>& extra_env);
  ~LocalRanks();
  LocalRanks(const LocalRanks&) = delete;
  LocalRanks& operator=(const LocalRanks&) = delete;

 private:
  std::vector<int> pids_;
};

}  // namespace spear
