#include "parallel/process_group.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <thread>

#include "core/error.h"

extern char** environ;

namespace spear {

namespace {

using Clock = std::chrono::steady_clock;

// All headers travel in native byte order: the ranks of one group run the same build on the same kind of host
// (the all-reduce ships raw floats anyway). A byte-swapped magic reads as a stranger and is turned away.
constexpr uint32_t kMagic = 0x53505450;  // 'SPTP'
constexpr uint32_t kVersion = 1;

// Sent by every rank r > 0 right after connecting; rank 0 answers with an Ack.
struct Hello {
  uint32_t magic, version, rank, size;
};
enum AckStatus : uint32_t { kAccepted = 0, kBadVersion, kBadSize, kBadRank, kDuplicateRank };
// Carries rank 0's version and size so that a rejected rank can say what did not match.
struct Ack {
  uint32_t magic, version, status, size;
};

Clock::time_point deadline_after(double s) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(std::max(s, 0.0)));
}

int ms_until(Clock::time_point deadline) {
  int64_t ms = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return int(std::clamp<int64_t>(ms, 0, INT_MAX));
}

// Control messages are small and latency-bound (one all-reduce per layer on the CPU backend): no Nagle delay.
void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Waits until fd has `events` or the deadline passes (false).
bool poll_until(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, ms_until(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) fail("tensor parallel: poll failed: {}", std::strerror(errno));
  }
}

// One connection attempt, bounded by the deadline (a host that drops SYNs would otherwise block for minutes).
// Returns the connected, blocking socket or -1 with the reason in *why.
int try_connect(const std::string& host, int port, Clock::time_point deadline, std::string* why) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (rc != 0) {
    *why = ::gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      *why = std::strerror(errno);
      continue;
    }
    int err = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      socklen_t len = sizeof err;
      if (!poll_until(fd, POLLOUT, deadline)) {
        err = ETIMEDOUT;
      } else if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
        err = errno;
      }
    }
    if (err != 0) {
      *why = std::strerror(err);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  if (fd >= 0) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    set_nodelay(fd);
  }
  return fd;
}

// Best effort: used for acks, where a peer that already left is reported by the caller's own error.
void send_quietly(int fd, const void* data, size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return;
    p += k;
    n -= size_t(k);
  }
}

[[noreturn]] void fail_closed(int peer) {
  fail("tensor parallel: rank {} closed its connection (it may have failed; see its output)", peer);
}

}  // namespace

std::unique_ptr<ProcessGroup> ProcessGroup::listen(int size, int port) {
  SPEAR_CHECK(size >= 1, "tensor parallel: group size {} must be at least 1", size);
  SPEAR_CHECK(port >= 0 && port <= 65535, "tensor parallel: port {} is out of range", port);
  std::unique_ptr<ProcessGroup> pg(new ProcessGroup(0, size));
  pg->fds_.assign(size_t(size), -1);
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("tensor parallel: cannot create a socket: {}", std::strerror(errno));
  pg->listen_fd_ = fd;  // closed by ~ProcessGroup from here on
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(uint16_t(port));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    fail("tensor parallel: cannot bind port {}: {}", port, std::strerror(errno));
  }
  if (::listen(fd, SOMAXCONN) != 0) fail("tensor parallel: cannot listen on port {}: {}", port, std::strerror(errno));
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    fail("tensor parallel: getsockname failed: {}", std::strerror(errno));
  }
  pg->port_ = ntohs(addr.sin_port);
  return pg;
}

void ProcessGroup::accept_peers(double timeout_s) {
  SPEAR_CHECK(rank_ == 0 && listen_fd_ >= 0, "tensor parallel: accept_peers is rank 0's, once, after listen");
  const Clock::time_point deadline = deadline_after(timeout_s);
  // Accepted connections whose handshake has not fully arrived; polled together with the listener so that a
  // slow or stray connection does not hold up the others.
  struct Pending {
    int fd;
    Hello hello;
    size_t got;
  };
  std::vector<Pending> pending;
  int joined = 0;

  // Validates a complete handshake; a rejected rank is told why (so that both sides report it) before we fail.
  auto admit = [&](int fd, const Hello& h) {
    if (h.magic != kMagic) {  // not a SPEAR rank (a port scanner, a stale client): ignore it
      ::close(fd);
      return;
    }
    uint32_t status = kAccepted;
    if (h.version != kVersion) {
      status = kBadVersion;
    } else if (h.size != uint32_t(size_)) {
      status = kBadSize;
    } else if (h.rank < 1 || h.rank >= uint32_t(size_)) {
      status = kBadRank;
    } else if (fds_[h.rank] >= 0) {
      status = kDuplicateRank;
    }
    Ack ack{kMagic, kVersion, status, uint32_t(size_)};
    send_quietly(fd, &ack, sizeof ack);
    if (status == kAccepted) {
      fds_[h.rank] = fd;
      ++joined;
      return;
    }
    ::close(fd);
    switch (status) {
      case kBadVersion:
        fail("tensor parallel: rank {} speaks protocol version {}, rank 0 version {} (different builds?)", h.rank,
             h.version, kVersion);
      case kBadSize:
        fail("tensor parallel: rank {} was started with group size {}, but rank 0 has group size {}", h.rank, h.size,
             size_);
      case kBadRank:
        fail("tensor parallel: a peer connected as rank {}, outside 1..{} of a group of size {}", h.rank, size_ - 1,
             size_);
      default:
        fail("tensor parallel: two ranks connected as rank {}", h.rank);
    }
  };

  try {
    while (joined < size_ - 1) {
      int left = ms_until(deadline);
      if (left == 0) {
        std::string missing;
        for (int r = 1; r < size_; ++r) {
          if (fds_[size_t(r)] < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
        fail("tensor parallel: only {} of {} ranks connected to port {} within {} s (missing ranks: {})", joined,
             size_ - 1, port_, timeout_s, missing);
      }
      std::vector<pollfd> pfds{{listen_fd_, POLLIN, 0}};
      for (const Pending& p : pending) pfds.push_back({p.fd, POLLIN, 0});
      int rc = ::poll(pfds.data(), pfds.size(), left);
      if (rc < 0 && errno != EINTR) fail("tensor parallel: poll failed: {}", std::strerror(errno));
      if (rc <= 0) continue;
      // Backwards, so that erasing pending[i] keeps pfds[j + 1] <-> pending[j] for the j < i still to visit.
      for (size_t i = pending.size(); i-- > 0;) {
        if (pfds[i + 1].revents == 0) continue;
        Pending& p = pending[i];
        ssize_t k = ::recv(p.fd, reinterpret_cast<char*>(&p.hello) + p.got, sizeof(Hello) - p.got, MSG_DONTWAIT);
        if (k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (k > 0) p.got += size_t(k);
        if (k > 0 && p.got < sizeof(Hello)) continue;
        Pending done = p;
        pending.erase(pending.begin() + std::ptrdiff_t(i));
        if (k <= 0) {
          ::close(done.fd);  // gone before its handshake was complete: not a rank we can use
        } else {
          admit(done.fd, done.hello);
        }
      }
      if (pfds[0].revents & POLLIN) {
        int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) {
          set_nodelay(fd);
          pending.push_back({fd, {}, 0});
        } else if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN) {
          fail("tensor parallel: accept on port {} failed: {}", port_, std::strerror(errno));
        }
      }
    }
  } catch (...) {
    for (const Pending& p : pending) ::close(p.fd);
    throw;
  }
  for (const Pending& p : pending) ::close(p.fd);
  // Everyone is here: free the port rather than let late connections queue on it.
  ::close(listen_fd_);
  listen_fd_ = -1;
}

std::unique_ptr<ProcessGroup> ProcessGroup::connect(int rank, int size, const std::string& host, int port,
                                                    double timeout_s) {
  SPEAR_CHECK(size >= 2 && rank >= 1 && rank < size, "tensor parallel: rank {} is not in 1..{} (group size {})", rank,
              size - 1, size);
  const Clock::time_point deadline = deadline_after(timeout_s);
  std::string why;
  int fd = -1;
  // Rank 0 may not be listening yet (it starts at the same time, or is still loading): retry until the deadline.
  for (;;) {
    fd = try_connect(host, port, deadline, &why);
    if (fd >= 0 || Clock::now() >= deadline) break;
    std::this_thread::sleep_for(
        std::min(std::chrono::duration_cast<Clock::duration>(std::chrono::milliseconds(50)), deadline - Clock::now()));
  }
  if (fd < 0) {
    fail("tensor parallel: rank {} could not connect to rank 0 at {}:{} within {} s: {}", rank, host, port, timeout_s,
         why);
  }
  std::unique_ptr<ProcessGroup> pg(new ProcessGroup(rank, size));
  pg->fds_ = {fd};  // closed by ~ProcessGroup from here on
  pg->port_ = port;
  Hello hello{kMagic, kVersion, uint32_t(rank), uint32_t(size)};
  pg->send_all(0, &hello, sizeof hello);

  // Rank 0 answers once it is in accept_peers, which a launcher enters right after starting the ranks.
  Ack ack{};
  auto* p = reinterpret_cast<char*>(&ack);
  for (size_t got = 0; got < sizeof ack;) {
    if (!poll_until(fd, POLLIN, deadline)) {
      fail("tensor parallel: rank 0 at {}:{} accepted rank {}'s connection but did not answer within {} s", host, port,
           rank, timeout_s);
    }
    ssize_t k = ::recv(fd, p + got, sizeof ack - got, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k == 0 || (k < 0 && errno == ECONNRESET)) {
      fail("tensor parallel: rank 0 at {}:{} closed rank {}'s connection during the handshake", host, port, rank);
    }
    if (k < 0) fail("tensor parallel: receiving from rank 0 at {}:{} failed: {}", host, port, std::strerror(errno));
    got += size_t(k);
  }
  if (ack.magic != kMagic) fail("tensor parallel: {}:{} is not a SPEAR rank 0 (bad handshake reply)", host, port);
  switch (ack.status) {
    case kAccepted:
      return pg;
    case kBadVersion:
      fail("tensor parallel: rank 0 at {}:{} speaks protocol version {}, rank {} version {} (different builds?)", host,
           port, ack.version, rank, kVersion);
    case kBadSize:
      fail("tensor parallel: rank 0 at {}:{} has group size {}, but rank {} was started with group size {}", host, port,
           ack.size, rank, size);
    case kDuplicateRank:
      fail("tensor parallel: rank 0 at {}:{} already has a rank {} (two ranks started with the same rank?)", host, port,
           rank);
    default:
      fail("tensor parallel: rank 0 at {}:{} rejected rank {} of group size {}", host, port, rank, size);
  }
}

ProcessGroup::~ProcessGroup() {
  for (int fd : fds_) {
    if (fd >= 0) ::close(fd);
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

void ProcessGroup::send_all(int peer, const void* data, size_t n, bool more) {
  const int fd = fds_[rank_ == 0 ? size_t(peer) : 0];
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    // MSG_NOSIGNAL: a peer that died must surface as an Error here, not as SIGPIPE killing this rank.
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) fail_closed(peer);
      fail("tensor parallel: sending to rank {} failed: {}", peer, std::strerror(errno));
    }
    p += k;
    n -= size_t(k);
  }
}

void ProcessGroup::recv_all(int peer, void* data, size_t n) {
  const int fd = fds_[rank_ == 0 ? size_t(peer) : 0];
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::recv(fd, p, n, 0);
    if (k == 0) fail_closed(peer);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == ECONNRESET) fail_closed(peer);
      fail("tensor parallel: receiving from rank {} failed: {}", peer, std::strerror(errno));
    }
    p += k;
    n -= size_t(k);
  }
}

void ProcessGroup::broadcast(std::string& bytes) {
  if (rank_ == 0) {
    uint64_t len = bytes.size();
    for (int r = 1; r < size_; ++r) {
      send_all(r, &len, sizeof len, /*more=*/true);
      send_all(r, bytes.data(), bytes.size());
    }
    return;
  }
  uint64_t len = 0;
  recv_all(0, &len, sizeof len);
  bytes.resize(size_t(len));
  recv_all(0, bytes.data(), bytes.size());
}

void ProcessGroup::broadcast(void* data, size_t n) {
  uint64_t len = n;
  if (rank_ == 0) {
    for (int r = 1; r < size_; ++r) {
      send_all(r, &len, sizeof len, /*more=*/true);
      send_all(r, data, n);
    }
    return;
  }
  uint64_t sent = 0;
  recv_all(0, &sent, sizeof sent);
  if (sent != len) fail("tensor parallel: rank 0 broadcasts {} bytes, but rank {} expects {}", sent, rank_, n);
  recv_all(0, data, n);
}

void ProcessGroup::all_reduce_sum(float* x, size_t n) {
  if (size_ == 1) return;
  const uint64_t len = n;
  if (rank_ != 0) {
    send_all(0, &len, sizeof len, /*more=*/true);
    send_all(0, x, n * sizeof(float));
    recv_all(0, x, n * sizeof(float));
    return;
  }
  scratch_.resize(n);
  // One fixed order, x_0 + x_1 + ... in fp32, computed once here and copied out: every rank gets the same bits.
  for (int r = 1; r < size_; ++r) {
    uint64_t theirs = 0;
    recv_all(r, &theirs, sizeof theirs);
    if (theirs != len) fail("tensor parallel: rank {} all-reduces {} values, but rank 0 {}", r, theirs, n);
    recv_all(r, scratch_.data(), n * sizeof(float));
    for (size_t i = 0; i < n; ++i) x[i] += scratch_[i];
  }
  for (int r = 1; r < size_; ++r) send_all(r, x, n * sizeof(float));
}

void ProcessGroup::all_gather(const void* mine, size_t n, void* all) {
  auto* out = static_cast<char*>(all);
  // memmove: `mine` may be this rank's own slot of `all`.
  if (n > 0) std::memmove(out + size_t(rank_) * n, mine, n);
  if (size_ == 1) return;
  const uint64_t len = n;
  const size_t total = size_t(size_) * n;
  if (rank_ != 0) {
    send_all(0, &len, sizeof len, /*more=*/n > 0);
    if (n > 0) send_all(0, out + size_t(rank_) * n, n);
    recv_all(0, out, total);
    return;
  }
  for (int r = 1; r < size_; ++r) {
    uint64_t theirs = 0;
    recv_all(r, &theirs, sizeof theirs);
    if (theirs != len) fail("tensor parallel: rank {} all-gathers {} bytes, but rank 0 {}", r, theirs, n);
    recv_all(r, out + size_t(r) * n, n);
  }
  for (int r = 1; r < size_; ++r) send_all(r, out, total);
}

void ProcessGroup::barrier() {
  float token = 0.f;
  all_reduce_sum(&token, 1);
}

std::pair<std::string, int> parse_host_port(const std::string& s, const std::string& what) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) fail("{}: '{}' is not HOST:PORT", what, s);
  const char* first = s.data() + colon + 1;
  const char* last = s.data() + s.size();
  int port = 0;
  auto [end, ec] = std::from_chars(first, last, port);
  if (first == last || ec != std::errc() || end != last || port < 1 || port > 65535) {
    fail("{}: '{}' is not HOST:PORT", what, s);
  }
  return {s.substr(0, colon), port};
}

namespace {

// The current environment with each "KEY=VALUE" of `overrides` set, later entries replacing earlier ones.
std::vector<std::string> environment_with(const std::vector<std::string>& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) env.emplace_back(*e);
  for (const std::string& kv : overrides) {
    const size_t eq = kv.find('=');
    SPEAR_CHECK(eq != std::string::npos && eq > 0, "tensor parallel: environment entry '{}' is not KEY=VALUE", kv);
    const std::string_view key(kv.data(), eq + 1);  // with the '=', so that FOO does not match FOOBAR
    std::erase_if(env, [&](const std::string& e) { return e.starts_with(key); });
    env.push_back(kv);
  }
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (std::string& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

void kill_and_reap(pid_t pid) {
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace

LocalRanks::LocalRanks(int size, int port, const std::vector<std::string>& argv,
                       const std::vector<std::string>& extra_env) {
  SPEAR_CHECK(!argv.empty(), "tensor parallel: cannot start local ranks without argv");
  std::vector<std::string> args = argv;
  std::vector<char*> c_args = c_strings(args);

  struct FileActions {
    posix_spawn_file_actions_t a;
    FileActions() { posix_spawn_file_actions_init(&a); }
    ~FileActions() { posix_spawn_file_actions_destroy(&a); }
  } actions;
  // Rank 0 reports; the others' standard output would only interleave with it. Their errors stay visible.
  posix_spawn_file_actions_addopen(&actions.a, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);

  for (int r = 1; r < size; ++r) {
    std::vector<std::string> overrides = {fmt::format("SPEAR_TP_RANK={}", r), fmt::format("SPEAR_TP_SIZE={}", size),
                                          fmt::format("SPEAR_TP_MASTER=127.0.0.1:{}", port)};
    overrides.insert(overrides.end(), extra_env.begin(), extra_env.end());
    std::vector<std::string> env;
    try {
      env = environment_with(overrides);
    } catch (...) {
      for (pid_t pid : pids_) kill_and_reap(pid);
      throw;
    }
    std::vector<char*> c_env = c_strings(env);
    pid_t pid = 0;
    int rc = ::posix_spawn(&pid, "/proc/self/exe", &actions.a, nullptr, c_args.data(), c_env.data());
    if (rc != 0) {
      for (pid_t started : pids_) kill_and_reap(started);
      fail("tensor parallel: cannot start rank {} (/proc/self/exe): {}", r, std::strerror(rc));
    }
    pids_.push_back(pid);
  }
}

LocalRanks::~LocalRanks() {
  // The ranks exit on their own once rank 0 closes their connections; the grace period covers their teardown.
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(30);
  std::vector<int> running = pids_;
  while (!running.empty() && Clock::now() < deadline) {
    std::erase_if(running, [](int pid) {
      pid_t rc = ::waitpid(pid, nullptr, WNOHANG);
      return rc == pid || (rc < 0 && errno != EINTR);
    });
    if (!running.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (int pid : running) {
    const auto rank = std::find(pids_.begin(), pids_.end(), pid) - pids_.begin() + 1;
    fmt::print(stderr, "tensor parallel: rank {} (pid {}) still running 30 s after rank 0 finished; killed\n", rank,
               pid);
    kill_and_reap(pid);
  }
}

}  // namespace spear
