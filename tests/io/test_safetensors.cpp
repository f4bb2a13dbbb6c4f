// safetensors reading: real checkpoints, and every way a file can lie.
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "test_util.h"

namespace spear {
namespace fs = std::filesystem;
using test::scratch_dir;

namespace {

void write_raw(const std::string& path, const std::string& header, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
}

// A well-formed file with two F32 tensors "a" [2,3] and "b" [4].
std::string good_file(const std::string& dir) {
  std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {7, 8, 9, 10};
  std::string p = dir + "/good.safetensors";
  write_safetensors(p, {{"a", DType::F32, {2, 3}, a.data(), 24}, {"b", DType::F32, {4}, b.data(), 16}},
                    {{"format", "pt"}});
  return p;
}

}  // namespace

TEST(Safetensors, RoundTrip) {
  auto dir = scratch_dir("st_rt");
  SafetensorsFile f(good_file(dir));
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  auto a = f.find("a")->to_f32();
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(f.find("b")->shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(f.find("b")->to_f32()[3], 10.f);
  EXPECT_EQ(f.find("nope"), nullptr);
}

TEST(Safetensors, ShardedReferenceCheckpoint) {
  Checkpoint ck(test::ref_model_dir());
  EXPECT_EQ(ck.num_files(), 4u);
  const TensorView& e = ck.get("model.embed_tokens.weight");
  EXPECT_EQ(e.dtype, DType::BF16);
  EXPECT_EQ(e.shape, (std::vector<int64_t>{8192, 512}));
  size_t params = 0;
  for (const auto& n : ck.names()) params += size_t(ck.get(n).numel());
  EXPECT_EQ(params, 23075328u);  // reference.json "parameters"
  EXPECT_SPEAR_ERROR(ck.get("lm_head.weight"), "no tensor 'lm_head.weight'");
}

TEST(SafetensorsBad, TooShort) {
  auto dir = scratch_dir("st_short");
  std::ofstream(dir + "/x.safetensors") << "abc";
  EXPECT_SPEAR_ERROR(SafetensorsFile(dir + "/x.safetensors"), "only 3 bytes");
}

TEST(SafetensorsBad, Missing) { EXPECT_SPEAR_ERROR(SafetensorsFile("/nonexistent/x.safetensors"), "cannot open"); }

TEST(SafetensorsBad, HeaderLengthPastEnd) {
  auto dir = scratch_dir("st_hlen");
  write_raw(dir + "/x.safetensors", "{}", "");
  // Rewrite the length to claim more than the file holds.
  std::fstream f(dir + "/x.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  uint64_t n = 1000;
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.close();
  EXPECT_SPEAR_ERROR(SafetensorsFile(dir + "/x.safetensors"), "runs past the end");
}

TEST(SafetensorsBad, HugeHeaderLength) {
  auto dir = scratch_dir("st_huge");
  std::ofstream out(dir + "/x.safetensors", std::ios::binary);
  uint64_t n = ~0ull;
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << "{}";
  out.close();
  EXPECT_SPEAR_ERROR(SafetensorsFile(dir + "/x.safetensors"), "exceeds");
}

TEST(SafetensorsBad, NotJson) {
  auto dir = scratch_dir("st_json");
  write_raw(dir + "/x.safetensors", "{\"a\": [1, 2", "");
  EXPECT_SPEAR_ERROR(SafetensorsFile(dir + "/x.safetensors"), "not valid JSON");
  write_raw(dir + "/y.safetensors", "[1,2]", "");
  EXPECT_SPEAR_ERROR(SafetensorsFile(dir + "/y.safetensors"), "must be a JSON object");
}

TEST(SafetensorsBad, HeaderLies) {
  auto dir = scratch_dir("st_lies");
  std::string data(64, '\0');
  struct Case {
    const char* header;
    const char* expect;
  } cases[] = {
      {R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,100]}})", "outside the data section"},
      {R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", "needs 24 bytes"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       "overlap"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "begin 8 > end 0"},
      {R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", "unsupported dtype 'Q7'"},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "non-negative"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", "data_offsets must be"},
      {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", "missing dtype"},
      {R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", "missing shape"},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", "too large"},
      {R"({"__metadata__":{"k":1}})", "__metadata__[k] must be a string"},
  };
  int i = 0;
  for (const auto& c : cases) {
    std::string p = dir + "/case" + std::to_string(i++) + ".safetensors";
    write_raw(p, c.header, data);
    EXPECT_SPEAR_ERROR(SafetensorsFile{p}, c.expect);
  }
}

TEST(SafetensorsBad, TruncatedRealShard) {
  auto dir = scratch_dir("st_trunc");
  fs::path src = fs::path(test::ref_model_dir()) / "model-00004-of-00004.safetensors";
  std::ifstream in(src, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t keep : {size_t(4), size_t(100), bytes.size() / 2, bytes.size() - 1}) {
    std::ofstream(dir + "/t.safetensors", std::ios::binary).write(bytes.data(), std::streamsize(keep));
    EXPECT_THROW(SafetensorsFile(dir + "/t.safetensors"), Error) << "kept " << keep;
  }
}

TEST(CheckpointBad, MissingShardAndIndexLies) {
  auto dir = scratch_dir("ck_bad");
  for (const auto& e : fs::directory_iterator(test::ref_model_dir())) fs::copy(e.path(), dir + "/" + e.path().filename().string());
  fs::remove(dir + "/model-00002-of-00004.safetensors");
  EXPECT_SPEAR_ERROR(Checkpoint{dir}, "shard 'model-00002-of-00004.safetensors' listed in model.safetensors.index.json is missing");

  auto dir2 = scratch_dir("ck_bad2");
  std::vector<float> a = {1, 2};
  write_safetensors(dir2 + "/s1.safetensors", {{"a", DType::F32, {2}, a.data(), 8}});
  std::ofstream(dir2 + "/model.safetensors.index.json") << R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}})";
  EXPECT_SPEAR_ERROR(Checkpoint{dir2}, "tensor 'b' is listed in the index");
  std::ofstream(dir2 + "/model.safetensors.index.json") << R"({"weight_map":{"a":"../s1.safetensors"}})";
  EXPECT_SPEAR_ERROR(Checkpoint{dir2}, "plain file name");
  std::ofstream(dir2 + "/model.safetensors.index.json") << R"({"metadata":{}})";
  EXPECT_SPEAR_ERROR(Checkpoint{dir2}, "weight_map");

  auto empty = scratch_dir("ck_empty");
  EXPECT_SPEAR_ERROR(Checkpoint{empty}, "no model.safetensors");
}

}  // namespace spear
