// Incremental detokenization: stop strings across token boundaries, UTF-8 held back until complete, and the
// KV block accounting the engine schedules with.
#include <gtest/gtest.h>

#include "core/error.h"
#include "runtime/kv_blocks.h"
#include "runtime/text_stream.h"
#include "tokenizer/tokenizer.h"

namespace spear {

namespace {

// Token i decodes to pieces[i].
TextStream::Decode fake_decoder(std::vector<std::string> pieces) {
  return [pieces](std::span<const int32_t> ids) {
    std::string s;
    for (int32_t i : ids) s += pieces.at(size_t(i));
    return s;
  };
}

}  // namespace

TEST(TextStream, StopStringAcrossTokensIsCutAndNotSent) {
  TextStream ts(fake_decoder({"Hello", " wor", "ld", "\n\n", "User", ":"}), {"\n\nUser:"});
  std::string out;
  out += ts.push(0);
  out += ts.push(1);
  out += ts.push(2);
  EXPECT_EQ(out, "Hello world");
  EXPECT_EQ(ts.push(3), "");  // "\n\n" may start the stop string: held back
  EXPECT_EQ(ts.push(4), "");
  EXPECT_FALSE(ts.stopped());
  EXPECT_EQ(ts.push(5), "");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "Hello world");
  EXPECT_EQ(ts.flush(), "");
  EXPECT_EQ(ts.push(0), "");  // nothing after a stop
}

TEST(TextStream, HeldBackTextIsReleasedWhenItIsNotAStop) {
  TextStream ts(fake_decoder({"a\n", "\n", "b", "x"}), {"\n\nUser"});
  EXPECT_EQ(ts.push(0), "a");
  EXPECT_EQ(ts.push(1), "");
  EXPECT_EQ(ts.push(2), "\n\nb");
  EXPECT_EQ(ts.push(3), "x");
  EXPECT_FALSE(ts.stopped());
}

TEST(TextStream, StopInsideOneTokenAndFlushAtEnd) {
  TextStream ts(fake_decoder({"one", " two. END three", "!"}), {"END", "xyz"});
  EXPECT_EQ(ts.push(0), "one");
  EXPECT_EQ(ts.push(1), " two. ");
  EXPECT_TRUE(ts.stopped());
  TextStream t2(fake_decoder({"abc", "ne"}), {"never"});
  EXPECT_EQ(t2.push(0), "abc");
  EXPECT_EQ(t2.push(1), "");         // "ne" could begin "never"
  EXPECT_EQ(t2.flush(), "ne");       // generation ended for another reason: the rest goes out
}

TEST(TextStream, PartialUtf8IsHeldUntilComplete) {
  // "é" = C3 A9, "€" = E2 82 AC split over tokens.
  TextStream ts(fake_decoder({"caf", "\xC3", "\xA9", " \xE2\x82", "\xAC"}), {});
  EXPECT_EQ(ts.push(0), "caf");
  EXPECT_EQ(ts.push(1), "");
  EXPECT_EQ(ts.push(2), "\xC3\xA9");
  EXPECT_EQ(ts.push(3), " ");
  EXPECT_EQ(ts.push(4), "\xE2\x82\xAC");
  EXPECT_EQ(utf8_complete_prefix("ab\xF0\x9F"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(utf8_complete_prefix("\x80\x80\x80\x80"), 4u);  // stray continuation bytes are not held forever
}

TEST(KvBlocks, ReserveGrowReleaseAndRefuse) {
  KvBlockAllocator a(10, 3);
  EXPECT_EQ(KvBlockAllocator::blocks_for(1), 1);
  EXPECT_EQ(KvBlockAllocator::blocks_for(16), 1);
  EXPECT_EQ(KvBlockAllocator::blocks_for(17), 2);
  EXPECT_TRUE(a.reserve(0, 33));  // 3 blocks
  EXPECT_EQ(a.held(0), 3);
  EXPECT_TRUE(a.reserve(0, 40));  // still 3
  EXPECT_EQ(a.free(), 7);
  EXPECT_TRUE(a.reserve(1, 16 * 7));
  EXPECT_EQ(a.free(), 0);
  EXPECT_FALSE(a.reserve(2, 1));  // nothing changes on refusal
  EXPECT_EQ(a.held(2), 0);
  EXPECT_EQ(a.needed(0, 49), 1);
  a.release(1);
  EXPECT_EQ(a.free(), 7);
  a.release(0);
  EXPECT_EQ(a.used(), 0);
  EXPECT_THROW(KvBlockAllocator(0, 1), Error);
}

}  // namespace spear
