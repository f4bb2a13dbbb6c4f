#include "quant/package.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/dtype.h"
#include "core/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

namespace spear {

namespace fs = std::filesystem;
using nlohmann::json;

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

bool is_package(const std::string& dir) { return fs::exists(fs::path(dir) / "manifest.json"); }

json manifest_to_json(const PackageManifest& m) {
  json mods = json::array();
  for (const auto& c : m.compensators) mods.push_back({{"module", c.module}, {"rank", c.rank}, {"gate_width", c.gate_width}});
  json comp = {{"file", m.compensators.empty() ? "" : "compensators.safetensors"},
               {"bytes", m.compensator_bytes},
               {"modules", mods}};
  return json{{"format", "spear-package"},
              {"format_version", m.format_version},
              {"tool_version", m.tool_version},
              {"source_model", m.source_model},
              {"quantization",
               {{"method", m.method},
                {"bits", m.params.bits},
                {"group_size", m.params.group_size},
                {"symmetric", m.params.symmetric},
                {"container_bits", m.container_bits}}},
              {"calibration",
               {{"source", m.calibration_source},
                {"file", m.calibration_file},
                {"samples", m.calibration_samples},
                {"length", m.calibration_len},
                {"seed", m.seed},
                {"data_hash", m.data_hash}}},
              {"quantized_modules", m.quantized_modules},
              {"compensators", comp},
              {"extra", m.extra}};
}

PackageManifest read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  json j = read_json_file(path);
  auto field = [&](const json& o, const char* key, const char* where) -> const json& {
    if (!o.is_object() || !o.contains(key)) fail("{}: missing '{}{}'", path, where, key);
    return o[key];
  };
  try {
    if (j.value("format", "") != "spear-package") fail("{}: not a SPEAR package manifest (format != spear-package)", path);
    PackageManifest m;
    m.format_version = field(j, "format_version", "").get<int>();
    if (m.format_version != kPackageFormatVersion && m.format_version != 1)
      fail("{}: package format version {} is not supported (this build reads version {}); re-quantize with this "
           "version of spear",
           path, m.format_version, kPackageFormatVersion);
    m.tool_version = j.value("tool_version", "");
    m.source_model = j.value("source_model", "");
    const json& q = field(j, "quantization", "");
    m.method = field(q, "method", "quantization.").get<std::string>();
    m.params.bits = field(q, "bits", "quantization.").get<int>();
    m.params.group_size = field(q, "group_size", "quantization.").get<int>();
    m.params.symmetric = field(q, "symmetric", "quantization.").get<bool>();
    m.container_bits = field(q, "container_bits", "quantization.").get<int>();
    if (m.params.bits < 2 || m.params.bits > 8) fail("{}: quantization.bits {} outside 2..8", path, m.params.bits);
    if (m.params.group_size == 0 || m.params.group_size < -1) fail("{}: quantization.group_size {} invalid", path, m.params.group_size);
    if (m.container_bits != (m.params.bits <= 4 ? 4 : 8))
      fail("{}: container_bits {} does not fit bits {}", path, m.container_bits, m.params.bits);
    if (j.contains("calibration")) {
      const json& c = j["calibration"];
      m.calibration_source = c.value("source", "none");
      m.calibration_file = c.value("file", "");
      m.calibration_samples = c.value("samples", 0);
      m.calibration_len = c.value("length", 0);
      m.seed = c.value("seed", uint64_t(0));
      m.data_hash = c.value("data_hash", "");
    }
    m.quantized_modules = field(j, "quantized_modules", "").get<std::vector<std::string>>();
    if (j.contains("extra")) m.extra = j["extra"];
    if (j.contains("compensators") && !j["compensators"].is_null()) {
      const json& c = j["compensators"];
      m.compensator_bytes = c.value("bytes", size_t(0));
      for (const json& e : field(c, "modules", "compensators.")) {
        CompensatorInfo ci;
        ci.module = field(e, "module", "compensators.modules[].").get<std::string>();
        ci.rank = field(e, "rank", "compensators.modules[].").get<int>();
        ci.gate_width = field(e, "gate_width", "compensators.modules[].").get<int>();
        if (ci.rank <= 0 || ci.gate_width < 0) fail("{}: compensator '{}' has rank {} gate_width {}", path, ci.module, ci.rank, ci.gate_width);
        m.compensators.push_back(ci);
      }
    }
    return m;
  } catch (const json::exception& e) {
    fail("{}: malformed manifest: {}", path, e.what());
  }
}

void write_package(const std::string& out_dir, const std::string& source_dir, const PackageManifest& manifest,
                   const std::map<std::string, PackedQuantWeights>& quantized, const std::vector<Compensator>& ecs) {
  fs::create_directories(out_dir);
  Checkpoint src(source_dir);
  std::vector<TensorToWrite> tensors;
  std::vector<std::string> names = src.names();
  std::sort(names.begin(), names.end());
  std::vector<std::vector<uint8_t>> owned;  // keeps converted buffers alive until written
  for (const auto& n : names) {
    const TensorView& t = src.get(n);
    const std::string suffix = ".weight";
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0 &&
        quantized.count(n.substr(0, n.size() - suffix.size())))
      continue;  // replaced by its packed form below
    tensors.push_back({n, t.dtype, t.shape, t.data, t.nbytes});
  }
  for (const auto& [module, p] : quantized) {
    const int G = p.groups();
    tensors.push_back({module + ".qweight", DType::U8, {p.out, int64_t(p.row_bytes())}, p.qweight.data(), p.qweight.size()});
    tensors.push_back({module + ".scales", DType::F32, {p.out, G}, p.scales.data(), p.scales.size() * sizeof(float)});
    tensors.push_back({module + ".zeros", DType::U8, {p.out, G}, p.zeros.data(), p.zeros.size()});
  }
  std::sort(tensors.begin(), tensors.end(), [](const TensorToWrite& a, const TensorToWrite& b) { return a.name < b.name; });
  write_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"format", "spear"}});
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json"}) {
    fs::path s = fs::path(source_dir) / f;
    if (fs::exists(s)) fs::copy_file(s, fs::path(out_dir) / f, fs::copy_options::overwrite_existing);
  }
  PackageManifest m = manifest;
  m.compensators.clear();
  m.compensator_bytes = 0;
  const fs::path ec_path = fs::path(out_dir) / "compensators.safetensors";
  fs::remove(ec_path);
  if (!ecs.empty()) {
    std::vector<Compensator> sorted = ecs;
    std::sort(sorted.begin(), sorted.end(), [](const Compensator& a, const Compensator& b) { return a.module < b.module; });
    std::vector<TensorToWrite> et;
    std::vector<std::vector<uint16_t>> bufs;
    bufs.reserve(sorted.size() * 6);
    for (const Compensator& c : sorted) {
      c.validate();
      m.compensators.push_back({c.module, c.rank, c.gate_width});
      m.compensator_bytes += c.bytes();
      auto add = [&](const char* part, const std::vector<float>& v, std::vector<int64_t> shape) {
        if (v.empty()) return;
        auto& b = bufs.emplace_back(v.size());
        for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
        et.push_back({c.module + "." + part, DType::BF16, std::move(shape), b.data(), b.size() * 2});
      };
      add("ec_A", c.A, {c.rank, c.in});
      add("ec_B", c.B, {c.out, c.rank});
      add("ec_W1", c.W1, {c.gate_width, c.rank});
      add("ec_b1", c.b1, {c.gate_width});
      add("ec_W2", c.W2, {c.rank, c.gate_width});
      add("ec_b2", c.b2, {c.rank});
    }
    std::sort(et.begin(), et.end(), [](const TensorToWrite& a, const TensorToWrite& b) { return a.name < b.name; });
    write_safetensors(ec_path.string(), et, {{"format", "spear-compensators"}});
  }
  std::ofstream(fs::path(out_dir) / "manifest.json") << manifest_to_json(m).dump(2) << "\n";
}

std::vector<Compensator> read_compensators(const std::string& dir, const PackageManifest& m,
                                           const std::map<std::string, std::pair<int, int>>& module_dims) {
  std::vector<Compensator> out;
  if (m.compensators.empty()) return out;
  const std::string path = (fs::path(dir) / "compensators.safetensors").string();
  if (!fs::exists(path)) fail("{}: the manifest lists {} compensators but compensators.safetensors is missing", dir, m.compensators.size());
  SafetensorsFile f(path);
  for (const CompensatorInfo& ci : m.compensators) {
    auto d = module_dims.find(ci.module);
    if (d == module_dims.end()) fail("{}: compensator for unknown module '{}'", path, ci.module);
    Compensator c;
    c.module = ci.module;
    c.resize(d->second.second, d->second.first, ci.rank, ci.gate_width);
    auto get = [&](const char* part, std::vector<float>& v, std::vector<int64_t> shape) {
      if (v.empty()) return;
      const std::string name = ci.module + "." + part;
      const TensorView* t = f.find(name);
      if (!t) fail("{}: missing tensor '{}' (corrupt or incomplete package)", path, name);
      if (t->shape != shape) {
        TensorView want;
        want.shape = shape;
        fail("{}: '{}' has shape {}, expected {} (rank {}, gate width {})", path, name, t->shape_str(), want.shape_str(), ci.rank, ci.gate_width);
      }
      v = t->to_f32();
      for (float x : v)
        if (!std::isfinite(x)) fail("{}: '{}' has a non-finite value", path, name);
    };
    get("ec_A", c.A, {c.rank, c.in});
    get("ec_B", c.B, {c.out, c.rank});
    get("ec_W1", c.W1, {c.gate_width, c.rank});
    get("ec_b1", c.b1, {c.gate_width});
    get("ec_W2", c.W2, {c.rank, c.gate_width});
    get("ec_b2", c.b2, {c.rank});
    out.push_back(std::move(c));
  }
  return out;
}

PackedQuantWeights read_quantized_linear(const Checkpoint& ck, const PackageManifest& m, const std::string& module,
                                         int out, int in) {
  PackedQuantWeights p;
  p.out = out;
  p.in = in;
  p.bits = m.params.bits;
  p.group_size = m.params.group_size;
  p.container_bits = m.container_bits;
  const int G = p.groups();
  auto need = [&](const std::string& suffix, DType dt, std::vector<int64_t> shape) -> const TensorView& {
    const TensorView* t = ck.find(module + suffix);
    if (!t) fail("{}: package is missing '{}{}' (corrupt or incomplete package)", ck.dir(), module, suffix);
    if (t->dtype != dt || t->shape != shape) {
      TensorView want;
      want.shape = shape;
      fail("{}: '{}{}' is {} {}, expected {} {} for a [{}, {}] layer with bits={} group_size={}", ck.dir(), module,
           suffix, dtype_name(t->dtype), t->shape_str(), dtype_name(dt), want.shape_str(), out, in, p.bits,
           p.group_size);
    }
    return *t;
  };
  const TensorView& q = need(".qweight", DType::U8, {out, int64_t(p.row_bytes())});
  const TensorView& s = need(".scales", DType::F32, {out, G});
  const TensorView& z = need(".zeros", DType::U8, {out, G});
  p.qweight.assign(q.data, q.data + q.nbytes);
  p.scales = s.to_f32();
  p.zeros.assign(z.data, z.data + z.nbytes);
  const int max_q = m.params.max_q();
  for (uint8_t zz : p.zeros)
    if (zz > max_q) fail("{}: '{}.zeros' has zero point {} > {} for {}-bit codes", ck.dir(), module, zz, max_q, p.bits);
  for (uint8_t c : p.qweight) {
    const int hi = p.container_bits == 8 ? c : std::max(c & 15, c >> 4);
    if (hi > max_q) fail("{}: '{}.qweight' has code {} > {} for {}-bit codes", ck.dir(), module, hi, max_q, p.bits);
  }
  for (float sc : p.scales)
    if (!std::isfinite(sc)) fail("{}: '{}.scales' has a non-finite scale", ck.dir(), module);
  return p;
}

}  // namespace spear
