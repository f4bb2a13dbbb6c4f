#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void TensorView::to_f32(float* dst) const {
  size_t n = size_t(numel());
  size_t es = dtype_size(dtype);
  if (reinterpret_cast<uintptr_t>(data) % es == 0) {
    convert_to_f32(dtype, data, dst, n);
  } else {
    std::vector<uint8_t> aligned(nbytes);
    std::memcpy(aligned.data(), data, nbytes);
    convert_to_f32(dtype, aligned.data(), dst, n);
  }
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  to_f32(out.data());
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_shared<MappedFile>(path)) {
  const size_t fsize = file_->size();
  if (fsize < 8) fail("{}: not a safetensors file (only {} bytes, need an 8-byte header length)", path, fsize);
  uint64_t n = 0;
  std::memcpy(&n, file_->data(), 8);  // little-endian host assumed (x86-64, aarch64)
  if (n > kMaxHeaderBytes) fail("{}: header length {} exceeds the {} byte limit (corrupt file?)", path, n, kMaxHeaderBytes);
  if (n > fsize - 8) fail("{}: header length {} runs past the end of the file ({} bytes): truncated?", path, n, fsize);
  const char* hdr = reinterpret_cast<const char*>(file_->data() + 8);
  json j;
  try {
    j = json::parse(hdr, hdr + n);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", path, e.what());
  }
  if (!j.is_object()) fail("{}: header must be a JSON object", path);

  const uint8_t* base = file_->data() + 8 + n;
  const size_t data_size = fsize - 8 - n;
  struct Range {
    size_t b, e;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail("{}: __metadata__ must be an object of strings", path);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail("{}: __metadata__[{}] must be a string", path, m.key());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail("{}: tensor '{}': entry must be an object", path, name);
    TensorView t;
    t.name = name;
    t.file = path;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) fail("{}: tensor '{}': missing dtype", path, name);
    if (!dtype_from_name(dt->get<std::string>(), &t.dtype))
      fail("{}: tensor '{}': unsupported dtype '{}'", path, name, dt->get<std::string>());
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) fail("{}: tensor '{}': missing shape", path, name);
    // Element count with overflow guard: a lying header must not wrap around to a small size.
    unsigned __int128 count = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        fail("{}: tensor '{}': shape entries must be non-negative integers", path, name);
      t.shape.push_back(d.get<int64_t>());
      count *= uint64_t(t.shape.back());
      if (count > std::numeric_limits<uint64_t>::max()) fail("{}: tensor '{}': shape too large", path, name);
    }
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail("{}: tensor '{}': data_offsets must be [begin, end] of non-negative integers", path, name);
    uint64_t b = (*off)[0].get<uint64_t>(), e = (*off)[1].get<uint64_t>();
    if (b > e) fail("{}: tensor '{}': data_offsets begin {} > end {}", path, name, b, e);
    if (e > data_size)
      fail("{}: tensor '{}': data_offsets [{}, {}] outside the data section ({} bytes): truncated or corrupt",
           path, name, b, e, data_size);
    unsigned __int128 want = count * dtype_size(t.dtype);
    if (want != (e - b))
      fail("{}: tensor '{}': {} {} needs {} bytes but data_offsets give {}", path, name, dtype_name(t.dtype),
           t.shape_str(), uint64_t(want), e - b);
    t.data = base + b;
    t.nbytes = e - b;
    auto [pos, inserted] = tensors_.emplace(name, std::move(t));
    ranges.push_back({size_t(b), size_t(e), &pos->first});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& c) { return a.b < c.b; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    const Range& p = ranges[i - 1];
    const Range& c = ranges[i];
    if (c.b < p.e && c.e > c.b && p.e > p.b)
      fail("{}: tensors '{}' and '{}' overlap in the data section", path, *p.name, *c.name);
  }
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index_path)) {
    json j;
    try {
      std::ifstream in(index_path);
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail("{}: invalid JSON: {}", index_path.string(), e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: missing 'weight_map' object", index_path.string());
    std::map<std::string, size_t> file_ids;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail("{}: weight_map['{}'] must be a file name", index_path.string(), it.key());
      std::string fname = it.value().get<std::string>();
      if (fname.find('/') != std::string::npos || fname == "..")
        fail("{}: shard name '{}' must be a plain file name", index_path.string(), fname);
      auto f = file_ids.find(fname);
      if (f == file_ids.end()) {
        fs::path shard = fs::path(dir) / fname;
        if (!fs::exists(shard))
          fail("{}: shard '{}' listed in model.safetensors.index.json is missing (needed for tensor '{}')", dir,
               fname, it.key());
        files_.push_back(std::make_unique<SafetensorsFile>(shard.string()));
        f = file_ids.emplace(fname, files_.size() - 1).first;
      }
      const TensorView* t = files_[f->second]->find(it.key());
      if (!t) fail("{}: tensor '{}' is listed in the index under '{}' but that shard does not contain it", dir,
                   it.key(), fname);
      index_[it.key()] = t;
    }
  } else if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& [name, t] : files_[0]->tensors()) index_[name] = &t;
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir);
  }
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) fail("{}: checkpoint has no tensor '{}'", dir_, name);
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : index_) out.push_back(k);
  return out;
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& [k, v] : index_) n += v->nbytes;
  return n;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json j = json::object();
  if (!metadata.empty()) j["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    uint64_t count = 1;
    for (auto d : t.shape) count *= uint64_t(d);
    if (count * dtype_size(t.dtype) != t.nbytes)
      fail("write {}: tensor '{}' has {} bytes, shape needs {}", path, t.name, t.nbytes, count * dtype_size(t.dtype));
    j[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {off, off + t.nbytes}}};
    off += t.nbytes;
  }
  std::string hdr = j.dump();
  while ((8 + hdr.size()) % 8) hdr.push_back(' ');
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write {}", tmp);
    uint64_t n = hdr.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(hdr.data(), std::streamsize(hdr.size()));
    for (const auto& t : tensors) out.write(static_cast<const char*>(t.data), std::streamsize(t.nbytes));
    if (!out) fail("error writing {}", tmp);
  }
  fs::rename(tmp, path);  // atomic: a reader never sees a half-written file
}

}  // namespace spear
