// The EC dispatch table (backend/ec_dispatch.h): choice of the fastest path, lookup by shape and token
// bucket, save/load round trip, and clear errors on bad files.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "backend/ec_dispatch.h"
#include "core/error.h"
#include "test_util.h"

namespace spear {

TEST(EcDispatch, PicksFastestAndLooksUpByBucket) {
  EcDispatchTable t;
  t.add(2048, 2048, 16, 8, 1, {{EcPath::Naive, 30.0}, {EcPath::Fused, 9.0}, {EcPath::Overlapped, 14.0}});
  t.add(2048, 2048, 16, 8, 32, {{EcPath::Naive, 40.0}, {EcPath::Fused, 21.0}, {EcPath::Overlapped, 20.0}});
  t.add(2048, 2048, 16, 8, 512, {{EcPath::Naive, 90.0}, {EcPath::Overlapped, 60.0}});
  EXPECT_EQ(t.entries[0].path, EcPath::Fused);
  EXPECT_EQ(t.entries[1].path, EcPath::Overlapped);
  EXPECT_EQ(t.lookup(2048, 2048, 16, 8, 1), EcPath::Fused);
  EXPECT_EQ(t.lookup(2048, 2048, 16, 8, 2), EcPath::Overlapped);     // next measured bucket up: 32
  EXPECT_EQ(t.lookup(2048, 2048, 16, 8, 4096), EcPath::Overlapped);  // beyond the largest: the largest
  EXPECT_EQ(t.lookup(2048, 2048, 32, 8, 1), EcPath::Auto);           // another rank: not in the table
  EXPECT_EQ(t.lookup(4096, 2048, 16, 8, 1), EcPath::Auto);
}

TEST(EcDispatch, SaveLoadRoundTripAndBadFiles) {
  const std::string dir = test::scratch_dir("ec_dispatch");
  std::filesystem::create_directories(dir);
  EcDispatchTable t;
  t.device = "cuda";
  t.add(512, 8192, 32, 0, 8, {{EcPath::Naive, 12.5}, {EcPath::Fused, 7.25}});
  t.save(dir + "/t.json");
  const EcDispatchTable u = EcDispatchTable::load(dir + "/t.json");
  ASSERT_EQ(u.entries.size(), 1u);
  EXPECT_EQ(u.device, "cuda");
  EXPECT_EQ(u.entries[0].path, EcPath::Fused);
  EXPECT_DOUBLE_EQ(u.entries[0].us.at(EcPath::Naive), 12.5);
  EXPECT_EQ(u.lookup(512, 8192, 32, 0, 8), EcPath::Fused);

  auto write = [&](const std::string& text) {
    std::ofstream(dir + "/bad.json") << text;
    return dir + "/bad.json";
  };
  EXPECT_THROW(EcDispatchTable::load(dir + "/missing.json"), Error);
  EXPECT_THROW(EcDispatchTable::load(write("{not json")), Error);
  EXPECT_THROW(EcDispatchTable::load(write(R"({"format": "other", "entries": []})")), Error);
  EXPECT_THROW(EcDispatchTable::load(write(
                   R"({"format": "spear-ec-dispatch-1", "entries": [{"n": 1, "k": 1, "rank": 1, "gate_width": 0, "m": 1, "path": "warp"}]})")),
               Error);
  EXPECT_THROW(EcDispatchTable::load(write(
                   R"({"format": "spear-ec-dispatch-1", "entries": [{"n": 0, "k": 1, "rank": 1, "gate_width": 0, "m": 1, "path": "naive"}]})")),
               Error);
  EXPECT_THROW(parse_ec_path("fast"), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace spear
