// The TCP process group: ranks run as threads of this process (and, for LocalRanks, as child processes of this
// test binary), so the sockets, handshake and rank-order reduction are exercised exactly as across hosts.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/process_group.h"

namespace spear {

namespace {

// Runs fn(group) on every rank of a group of `size`, ranks 1.. on threads; rethrows the first rank's error.
void run_group(int size, const std::function<void(ProcessGroup&)>& fn) {
  // Declared before rank 0's group: on an exception the group closes first, which frees the peers' threads.
  std::vector<std::future<void>> peers;
  auto pg = ProcessGroup::listen(size, 0);
  for (int r = 1; r < size; ++r) {
    peers.push_back(std::async(std::launch::async, [&fn, r, size, port = pg->port()] {
      auto peer = ProcessGroup::connect(r, size, "127.0.0.1", port, 5.0);
      fn(*peer);
    }));
  }
  pg->accept_peers(5.0);
  EXPECT_EQ(pg->rank(), 0);
  EXPECT_EQ(pg->size(), size);
  fn(*pg);
  for (auto& f : peers) f.get();
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A port that nobody listens on (bound once by the kernel's choice, then released).
int unused_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ::close(fd);
  return ntohs(addr.sin_port);
}

class ProcessGroupSizes : public ::testing::TestWithParam<int> {};

}  // namespace

TEST_P(ProcessGroupSizes, BroadcastStringsReplaceTheReceiversContents) {
  const int size = GetParam();
  std::string big(1 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = char(i * 131 + 7);
  const std::vector<std::string> messages = {"hello ranks", "", big, std::string("a\0b", 3)};
  std::vector<std::vector<std::string>> got(static_cast<size_t>(size));
  run_group(size, [&](ProcessGroup& pg) {
    for (const std::string& m : messages) {
      std::string s = pg.rank() == 0 ? m : "stale contents of rank " + std::to_string(pg.rank());
      pg.broadcast(s);
      got[size_t(pg.rank())].push_back(s);
    }
  });
  for (int r = 0; r < size; ++r) EXPECT_EQ(got[size_t(r)], messages) << "rank " << r;
}

TEST_P(ProcessGroupSizes, BroadcastBytes) {
  const int size = GetParam();
  std::vector<std::vector<int32_t>> got(static_cast<size_t>(size));
  run_group(size, [&](ProcessGroup& pg) {
    std::vector<int32_t> v(1000, -1);
    if (pg.rank() == 0) {
      for (size_t i = 0; i < v.size(); ++i) v[i] = int32_t(i * 7 + 3);
    }
    pg.broadcast(v.data(), v.size() * sizeof(int32_t));
    got[size_t(pg.rank())] = v;
  });
  for (int r = 0; r < size; ++r) {
    ASSERT_EQ(got[size_t(r)].size(), 1000u);
    for (size_t i = 0; i < 1000; ++i) ASSERT_EQ(got[size_t(r)][i], int32_t(i * 7 + 3)) << "rank " << r << " i " << i;
  }
}

TEST_P(ProcessGroupSizes, AllReduceSumsInRankOrderWithIdenticalBits) {
  const int size = GetParam();
  constexpr size_t n = 4099;
  // Values whose fp32 sum depends on the order: 1e8 + 1 rounds back to 1e8.
  const float pattern[] = {1e8f, 1.f, -1e8f, 0.1f, 3.3e-3f, -7.25f};
  // Power-of-two scales keep each input exact, so a fused multiply-add in the reference sum cannot change it.
  auto input = [&](int rank, size_t i) { return std::ldexp(pattern[(i + size_t(rank)) % 6], int(i % 7)); };
  std::vector<float> expected(n);
  for (size_t i = 0; i < n; ++i) {
    float s = input(0, i);
    for (int r = 1; r < size; ++r) s += input(r, i);
    expected[i] = s;
  }
  std::vector<std::vector<float>> got(static_cast<size_t>(size));
  run_group(size, [&](ProcessGroup& pg) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = input(pg.rank(), i);
    pg.all_reduce_sum(x.data(), n);
    got[size_t(pg.rank())] = x;
    // A second, tiny round on the same sockets: the streams stay aligned message to message.
    float one = float(pg.rank() + 1);
    pg.all_reduce_sum(&one, 1);
    EXPECT_EQ(one, float(size * (size + 1) / 2));
  });
  // Element 0: ranks hold 1e8, 1, (-1e8): 1e8 + 1 == 1e8 in fp32.
  EXPECT_EQ(expected[0], size == 2 ? 1e8f : 0.f);
  for (int r = 0; r < size; ++r) {
    ASSERT_EQ(got[size_t(r)].size(), n);
    EXPECT_EQ(std::memcmp(got[size_t(r)].data(), expected.data(), n * sizeof(float)), 0) << "rank " << r;
  }
}

TEST_P(ProcessGroupSizes, AllGatherAssemblesEveryRanksBytesInRankOrder) {
  const int size = GetParam();
  // A rank's record: n bytes that name the rank, the round and the position, so a slot swap or shift shows.
  auto byte = [](int rank, int round, size_t i) { return char(i * 31 + size_t(rank) * 101 + size_t(round) * 7 + 1); };
  const size_t lengths[] = {37, 0, 1 << 20, 1};
  std::vector<std::vector<std::string>> got(static_cast<size_t>(size));
  run_group(size, [&](ProcessGroup& pg) {
    for (size_t round = 0; round < std::size(lengths); ++round) {
      const size_t n = lengths[round];
      std::string mine(n, '\0');
      for (size_t i = 0; i < n; ++i) mine[i] = byte(pg.rank(), int(round), i);
      std::string all(size_t(size) * n, '?');
      if (round == 3) {
        // In place: this rank's record already sits in its own slot of the output.
        std::copy(mine.begin(), mine.end(), all.begin() + std::ptrdiff_t(size_t(pg.rank()) * n));
        pg.all_gather(all.data() + size_t(pg.rank()) * n, n, all.data());
      } else {
        pg.all_gather(mine.data(), n, all.data());
      }
      got[size_t(pg.rank())].push_back(all);
    }
  });
  for (int r = 0; r < size; ++r) {
    ASSERT_EQ(got[size_t(r)].size(), std::size(lengths));
    for (size_t round = 0; round < std::size(lengths); ++round) {
      const size_t n = lengths[round];
      std::string want;
      for (int q = 0; q < size; ++q)
        for (size_t i = 0; i < n; ++i) want.push_back(byte(q, int(round), i));
      EXPECT_TRUE(got[size_t(r)][round] == want) << "rank " << r << ", round " << round << " (" << n << " bytes)";
    }
  }
}

TEST_P(ProcessGroupSizes, BarrierWaitsForEveryRank) {
  const int size = GetParam();
  std::atomic<int> arrived{0};
  std::vector<int> seen(size_t(size), -1);
  run_group(size, [&](ProcessGroup& pg) {
    // The last rank arrives late: nobody may leave the barrier before it has arrived.
    if (pg.rank() == size - 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ++arrived;
    pg.barrier();
    seen[size_t(pg.rank())] = arrived.load();
  });
  for (int r = 0; r < size; ++r) EXPECT_EQ(seen[size_t(r)], size) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Sizes, ProcessGroupSizes, ::testing::Values(2, 3));

TEST(ProcessGroup, SizeOneIsALocalNoOp) {
  auto pg = ProcessGroup::listen(1, 0);
  pg->accept_peers(0.1);
  float x[2] = {1.5f, -2.f};
  pg->all_reduce_sum(x, 2);
  pg->barrier();
  std::string s = "kept";
  pg->broadcast(s);
  EXPECT_EQ(x[0], 1.5f);
  EXPECT_EQ(x[1], -2.f);
  EXPECT_EQ(s, "kept");
}

TEST(ProcessGroup, MismatchedSizeIsRejectedOnBothSides) {
  auto pg = ProcessGroup::listen(2, 0);
  auto peer = std::async(std::launch::async, [port = pg->port()] {
    return error_of([&] { ProcessGroup::connect(1, 3, "127.0.0.1", port, 2.0); });
  });
  const std::string at_rank0 = error_of([&] { pg->accept_peers(2.0); });
  const std::string at_peer = peer.get();
  EXPECT_NE(at_rank0.find("rank 1 was started with group size 3"), std::string::npos) << at_rank0;
  EXPECT_NE(at_rank0.find("rank 0 has group size 2"), std::string::npos) << at_rank0;
  EXPECT_NE(at_peer.find("has group size 2"), std::string::npos) << at_peer;
  EXPECT_NE(at_peer.find("started with group size 3"), std::string::npos) << at_peer;
}

TEST(ProcessGroup, DuplicateRankIsRejected) {
  auto pg = ProcessGroup::listen(3, 0);
  auto connect_as_1 = [port = pg->port()] {
    return error_of([&] { auto p = ProcessGroup::connect(1, 3, "127.0.0.1", port, 2.0); });
  };
  auto a = std::async(std::launch::async, connect_as_1);
  auto b = std::async(std::launch::async, connect_as_1);
  const std::string at_rank0 = error_of([&] { pg->accept_peers(2.0); });
  EXPECT_NE(at_rank0.find("two ranks connected as rank 1"), std::string::npos) << at_rank0;
  // One of the two was accepted, the other told why it was not.
  const std::string ea = a.get(), eb = b.get();
  EXPECT_TRUE((ea == "(no error)") != (eb == "(no error)")) << ea << " / " << eb;
  EXPECT_NE((ea + eb).find("already has a rank 1"), std::string::npos) << ea << " / " << eb;
}

TEST(ProcessGroup, ConnectToNobodyTimesOutNamingTheAddress) {
  const int port = unused_port();
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([&] { ProcessGroup::connect(1, 2, "127.0.0.1", port, 0.3); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(e.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << e;
  EXPECT_GE(s, 0.28);
  EXPECT_LT(s, 1.0);
}

TEST(ProcessGroup, AcceptTimesOutNamingTheMissingRanks) {
  auto pg = ProcessGroup::listen(3, 0);
  auto peer = std::async(std::launch::async,
                         [port = pg->port()] { auto p = ProcessGroup::connect(2, 3, "127.0.0.1", port, 2.0); });
  const std::string e = error_of([&] { pg->accept_peers(0.3); });
  peer.get();
  EXPECT_EQ(e, "tensor parallel: only 1 of 2 ranks connected to port " + std::to_string(pg->port()) +
                   " within 0.3 s (missing ranks: 1)");
}

TEST(ProcessGroup, PeerThatClosesFailsRankZerosReduce) {
  auto pg = ProcessGroup::listen(2, 0);
  auto peer = std::async(std::launch::async, [port = pg->port()] {
    ProcessGroup::connect(1, 2, "127.0.0.1", port, 2.0);  // and destroyed at once
  });
  pg->accept_peers(2.0);
  peer.get();
  float x[4] = {};
  const std::string e = error_of([&] { pg->all_reduce_sum(x, 4); });
  EXPECT_NE(e.find("rank 1 closed its connection"), std::string::npos) << e;
}

TEST(ProcessGroup, RankZeroThatClosesFailsThePeersReduce) {
  auto pg = ProcessGroup::listen(2, 0);
  auto peer = std::async(std::launch::async, [port = pg->port()] {
    auto p = ProcessGroup::connect(1, 2, "127.0.0.1", port, 2.0);
    std::vector<float> x(1000, 1.f);
    return error_of([&] { p->all_reduce_sum(x.data(), x.size()); });
  });
  pg->accept_peers(2.0);
  pg.reset();
  const std::string e = peer.get();
  EXPECT_NE(e.find("rank 0 closed its connection"), std::string::npos) << e;
}

TEST(ProcessGroup, ParseHostPort) {
  EXPECT_EQ(parse_host_port("127.0.0.1:29500", "--tp-master"), std::make_pair(std::string("127.0.0.1"), 29500));
  EXPECT_EQ(parse_host_port("node-1.cluster:1", "x"), std::make_pair(std::string("node-1.cluster"), 1));
  EXPECT_EQ(parse_host_port("h:65535", "x"), std::make_pair(std::string("h"), 65535));
  EXPECT_EQ(parse_host_port("a:b:80", "x"), std::make_pair(std::string("a:b"), 80));  // split at the last ':'
  for (const char* bad : {"host", ":80", "host:", "host:0", "host:65536", "host:12x", "host:-1", "host:+80", ""}) {
    EXPECT_EQ(error_of([&] { parse_host_port(bad, "--tp-master"); }),
              std::string("--tp-master: '") + bad + "' is not HOST:PORT");
  }
}

// The child side of LocalRanksStartsTheProgramAgain: this binary, started again with a filter that runs only this
// test and SPEAR_TP_* set. Run by itself it has nothing to join.
TEST(ProcessGroupChild, JoinsGroup) {
  const char* rank = std::getenv("SPEAR_TP_RANK");
  if (rank == nullptr) GTEST_SKIP() << "runs only as a rank started by LocalRanks";
  auto [host, port] = parse_host_port(std::getenv("SPEAR_TP_MASTER"), "SPEAR_TP_MASTER");
  auto pg = ProcessGroup::connect(std::atoi(rank), std::atoi(std::getenv("SPEAR_TP_SIZE")), host, port, 10.0);
  std::string s;
  pg->broadcast(s);
  const char* value = std::getenv("SPEAR_TP_TEST_VALUE");
  // Rank 0 checks the sum: (rank + 1) * SPEAR_TP_TEST_VALUE, plus 1000 for a broadcast received intact.
  float x = float((pg->rank() + 1) * (value ? std::atoi(value) : 0)) + (s == "go" ? 1000.f : 0.f);
  pg->all_reduce_sum(&x, 1);
}

TEST(LocalRanks, StartsTheProgramAgainWithTheGroupsEnvironment) {
  // extra_env must replace this inherited value, not add a second entry that the child might read instead.
  ::setenv("SPEAR_TP_TEST_VALUE", "1", 1);
  auto pg = ProcessGroup::listen(3, 0);
  float x = 5.f;
  {
    LocalRanks ranks(3, pg->port(), {"test_process_group", "--gtest_filter=ProcessGroupChild.JoinsGroup"},
                     {"SPEAR_TP_TEST_VALUE=5"});
    ::unsetenv("SPEAR_TP_TEST_VALUE");
    pg->accept_peers(10.0);
    std::string go = "go";
    pg->broadcast(go);
    pg->all_reduce_sum(&x, 1);
    pg.reset();  // the children finish once their reduce returns; ~LocalRanks reaps them
  }
  EXPECT_EQ(x, 5.f + (10.f + 1000.f) + (15.f + 1000.f));
}

TEST(LocalRanks, RejectsAnEnvironmentEntryWithoutEquals) {
  const std::string e = error_of([] { LocalRanks ranks(2, 1234, {"x"}, {"NOT_AN_ASSIGNMENT"}); });
  EXPECT_NE(e.find("'NOT_AN_ASSIGNMENT' is not KEY=VALUE"), std::string::npos) << e;
}

}  // namespace spear
