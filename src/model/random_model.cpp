// Random-weight checkpoints with the shapes of real models; the generator and layout are described in
// random_model.h.
#include "model/random_model.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace spear {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---- presets

ModelConfig llama(int vocab, int hidden, int layers, int heads, int kv_heads, int head_dim, int inter, bool tied,
                  int max_pos, RopeConfig rope, std::vector<int> bos, std::vector<int> eos) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.max_position_embeddings = max_pos;
  c.rms_norm_eps = 1e-5;
  c.rope = rope;
  c.tie_word_embeddings = tied;
  c.sliding_window.assign(size_t(layers), 0);
  c.dtype = DType::BF16;
  c.bos_token_ids = std::move(bos);
  c.eos_token_ids = std::move(eos);
  return c;
}

RopeConfig llama3_rope(double factor) {
  RopeConfig r;
  r.type = "llama3";
  r.theta = 500000.0;
  r.factor = factor;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position = 8192;
  return r;
}

RopeConfig default_rope(double theta) {
  RopeConfig r;
  r.theta = theta;
  return r;
}

// ---- generator

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // splitmix64's increment (2^64 / golden ratio)

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// ln(u) for u in (0, 1] (normal floats only), branch-free so the loop below vectorises: u = m·2^e with
// m in [√½, √2), ln u = e·ln2 + ln m, ln m by Cephes logf's minimax polynomial in x = m - 1 (about 1 ulp).
inline float log_unit(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int e = int(bits >> 23) - 127;
  uint32_t mbits = (bits & 0x7FFFFFu) | 0x3F800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mbits, 4);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float x = m - 1.f, z = x * x, fe = float(e);
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (x + y) + fe * 0.693359375f;
}

// sin and cos of t in [-π/4, π/4] (Cephes sinf / cosf polynomials, a few ulp).
inline void sincos_octant(float t, float& s, float& c) {
  const float z = t * t;
  s = t + t * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  c = 1.f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f);
}

// sqrt(a) for a >= 0 as a·rsqrt(a): bit-trick estimate and three Newton steps (relative error ~1e-7).
// Instead of std::sqrt because that may set errno, which keeps GCC from vectorising the loop.
inline float sqrt_nonneg(float a) {
  uint32_t bits;
  std::memcpy(&bits, &a, 4);
  bits = 0x5F375A86u - (bits >> 1);
  float y;
  std::memcpy(&y, &bits, 4);
  const float h = 0.5f * a;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return a * y;  // 0 for a = 0
}

// Standard normals for counters k0 .. k0+n-1 of stream `key`, two per counter (Box–Muller), scaled by `std`
// and rounded to bf16 into dst[0 .. 2n). Plain arithmetic only (no libm calls), so the bytes do not depend
// on the C library, and the loop vectorises (16 pairs per AVX-512 iteration).
void normal_pairs_bf16(uint64_t key, uint64_t k0, int64_t n, float std, uint16_t* dst) {
  constexpr float kQuarterStep = 1.57079632679489662f * 0x1p-22f;  // (π/2) / 2^22
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = splitmix64(key + (k0 + uint64_t(i) + 1) * kGamma);
    // Radius from the top 24 bits: u1 = (h[63:40] + 1) / 2^24 in (0, 1], exact in fp32.
    const float u1 = float(uint32_t(h >> 40) + 1u) * 0x1p-24f;
    const float r = sqrt_nonneg(-2.f * log_unit(u1));
    // Angle 2π·v / 2^24 from the low 24 bits, as the nearest quarter turn q plus a remainder in [-π/4, π/4).
    const uint32_t v = uint32_t(h) & 0xFFFFFFu;
    const uint32_t q = (v + (1u << 21)) >> 22;                 // 0..4
    const float t = float(int32_t(v) - int32_t(q << 22)) * kQuarterStep;
    float s, c;
    sincos_octant(t, s, c);
    const uint32_t quad = q & 3u;                                // cos, sin of (quad·π/2 + t):
    const float cq = (quad & 1u) ? s : c, sq = (quad & 1u) ? c : s;
    const float z0 = (quad == 1u || quad == 2u) ? -cq : cq;      // 0: c  1: -s  2: -c  3: s
    const float z1 = (quad >= 2u) ? -sq : sq;                    // 0: s  1: c   2: -s  3: -c
    dst[2 * i] = f32_to_bf16(std * (r * z0));
    dst[2 * i + 1] = f32_to_bf16(std * (r * z1));
  }
}

constexpr uint16_t kBf16One = 0x3F80;

// ---- layout

enum class Init { Normal, Ones, Zeros };

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  Init init;
  size_t numel() const {
    size_t n = 1;
    for (auto d : shape) n *= size_t(d);
    return n;
  }
  size_t nbytes() const { return numel() * 2; }  // bf16
};

// Every tensor of the checkpoint in the order of the forward pass (save_pretrained's order).
std::vector<TensorSpec> checkpoint_tensors(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_dim(), KV = c.kv_dim();
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", {V, H}, Init::Normal});
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto lin = [&](const std::string& n, int64_t out, int64_t in, bool bias) {
      t.push_back({p + n + ".weight", {out, in}, Init::Normal});
      if (bias) t.push_back({p + n + ".bias", {out}, Init::Zeros});  // transformers zero-initialises biases
    };
    lin("self_attn.q_proj", Q, H, c.qkv_bias);
    lin("self_attn.k_proj", KV, H, c.qkv_bias);
    lin("self_attn.v_proj", KV, H, c.qkv_bias);
    lin("self_attn.o_proj", H, Q, c.o_bias);
    lin("mlp.gate_proj", I, H, c.mlp_bias);
    lin("mlp.up_proj", I, H, c.mlp_bias);
    lin("mlp.down_proj", H, I, c.mlp_bias);
    t.push_back({p + "input_layernorm.weight", {H}, Init::Ones});
    t.push_back({p + "post_attention_layernorm.weight", {H}, Init::Ones});
  }
  t.push_back({"model.norm.weight", {H}, Init::Ones});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {V, H}, Init::Normal});
  return t;
}

void write_json(const fs::path& path, const json& j) {
  std::ofstream out(path);
  if (!out) fail("cannot write {}", path.string());
  out << j.dump(2) << "\n";
  if (!out) fail("error writing {}", path.string());
}

void check_output_dir(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir)) fail("{}: exists and is not a directory", dir);
    if (!fs::is_empty(dir))
      fail("{}: directory is not empty; refusing to overwrite it (choose a new directory or remove it)", dir);
  } else {
    fs::create_directories(dir, ec);
    if (ec) fail("{}: cannot create directory: {}", dir, ec.message());
  }
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

// ---- presets

const std::vector<ModelPreset>& model_presets() {
  static const std::vector<ModelPreset> presets = {
      {"tiny", "test model: hidden 128, 2 layers, 4 heads (2 kv), vocab 512, untied (0.43M)",
       llama(512, 128, 2, 4, 2, 32, 256, false, 2048, llama3_rope(32.0), {1}, {2})},
      {"llama-3.2-1b", "Llama 3.2 1B: hidden 2048, 16 layers, 32 heads (8 kv), vocab 128256, tied (1.24B)",
       llama(128256, 2048, 16, 32, 8, 64, 8192, true, 131072, llama3_rope(32.0), {128000}, {128001})},
      {"llama-3.2-3b", "Llama 3.2 3B: hidden 3072, 28 layers, 24 heads (8 kv), vocab 128256, tied (3.21B)",
       llama(128256, 3072, 28, 24, 8, 128, 8192, true, 131072, llama3_rope(32.0), {128000}, {128001})},
      {"llama-3.1-8b", "Llama 3.1 8B: hidden 4096, 32 layers, 32 heads (8 kv), vocab 128256, untied (8.03B)",
       llama(128256, 4096, 32, 32, 8, 128, 14336, false, 131072, llama3_rope(8.0), {128000}, {128001})},
      {"llama-2-13b", "Llama 2 13B shapes: hidden 5120, 40 layers, 40 heads (MHA), vocab 32000, untied (13.0B)",
       llama(32000, 5120, 40, 40, 40, 128, 13824, false, 4096, default_rope(10000.0), {1}, {2})},
  };
  return presets;
}

const ModelPreset& find_model_preset(std::string_view name) {
  std::string names;
  for (const auto& p : model_presets()) {
    if (p.name == name) return p;
    names += (names.empty() ? "" : ", ") + p.name;
  }
  fail("unknown model preset '{}' (available: {})", name, names);
}

json llama_config_json(const ModelConfig& c, const json& provenance) {
  if (c.architecture != "LlamaForCausalLM")
    fail("config.json writer: architecture '{}' is not supported (LlamaForCausalLM only)", c.architecture);
  json j = json::object();
  j["architectures"] = {c.architecture};
  j["model_type"] = "llama";
  j["attention_bias"] = c.qkv_bias;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = c.mlp_bias;
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["initializer_range"] = 0.02;
  j["pretraining_tp"] = 1;
  j["use_cache"] = true;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["torch_dtype"] = c.dtype == DType::BF16 ? "bfloat16" : c.dtype == DType::F16 ? "float16" : "float32";
  j["rope_theta"] = c.rope.theta;
  if (c.rope.type == "default") {
    j["rope_scaling"] = nullptr;
  } else if (c.rope.type == "linear") {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope.factor}};
  } else if (c.rope.type == "llama3") {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor},
                         {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_position}};
  } else {
    fail("config.json writer: RoPE type '{}' is not supported", c.rope.type);
  }
  auto ids = [](const std::vector<int>& v) -> json { return v.size() == 1 ? json(v[0]) : json(v); };
  if (!c.bos_token_ids.empty()) j["bos_token_id"] = ids(c.bos_token_ids);
  if (!c.eos_token_ids.empty()) j["eos_token_id"] = ids(c.eos_token_ids);
  if (!provenance.is_null()) j["spear_random"] = provenance;
  return j;
}

size_t parameter_count(const ModelConfig& c) {
  size_t n = 0;
  for (const TensorSpec& t : checkpoint_tensors(c)) n += t.numel();
  return n;
}

// ---- generator

uint64_t random_tensor_key(uint64_t seed, std::string_view tensor_name) {
  return splitmix64(splitmix64(seed) + fnv1a(tensor_name));
}

void fill_normal_bf16(uint16_t* dst, size_t n, uint64_t key, float std) {
  const int64_t pairs = int64_t(n / 2);
  constexpr int64_t kBlock = 4096;  // pairs per task
  const int64_t blocks = (pairs + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kBlock;
    normal_pairs_bf16(key, uint64_t(k0), std::min(kBlock, pairs - k0), std, dst + 2 * k0);
  }
  if (n & 1) {  // the last element takes the first value of its pair
    uint16_t last[2];
    normal_pairs_bf16(key, uint64_t(pairs), 1, std, last);
    dst[n - 1] = last[0];
  }
}

// ---- writer

RandomModelResult write_random_model(const ModelConfig& c, const std::string& out_dir, const RandomModelOptions& o) {
  using clk = std::chrono::steady_clock;
  const auto t0 = clk::now();
  if (c.dtype != DType::BF16) fail("random models are written in bf16; the config asks for {}", dtype_name(c.dtype));
  if (!(o.init_std > 0.f)) fail("init_std must be positive, got {}", o.init_std);
  if (o.decodable_vocab < 0 || o.decodable_vocab > c.vocab_size)
    fail("decodable vocabulary {} is outside the model's vocabulary of {}", o.decodable_vocab, c.vocab_size);
  const json provenance = {{"source", "random"},
                           {"like", o.like},
                           {"seed", o.seed},
                           {"init", fmt::format("normal(0, {}) for linears and embeddings, 1 for norms", o.init_std)},
                           {"note", o.decodable_vocab > 0
                                        ? fmt::format("random weights for benchmarks; output rows >= {} are zero "
                                                      "(a borrowed tokenizer's vocabulary)", o.decodable_vocab)
                                        : std::string("random weights for benchmarks; no tokenizer")}};
  // Validate the config the way the loader will before writing gigabytes.
  const json cfg_json = llama_config_json(c, provenance);
  parse_model_config(cfg_json, "config.json for " + out_dir, supported_architectures());

  const std::vector<TensorSpec> tensors = checkpoint_tensors(c);
  size_t total = 0;
  for (const auto& t : tensors) total += t.nbytes();

  check_output_dir(out_dir);
  const fs::space_info space = fs::space(out_dir);
  if (space.available < total + (64u << 20))
    fail("{}: needs {:.2f} GB for the weights but the file system has {:.2f} GB free", out_dir, total / 1e9,
         space.available / 1e9);

  // Greedy shard plan in forward order.
  std::vector<std::vector<size_t>> shards(1);
  size_t shard_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t b = tensors[i].nbytes();
    if (!shards.back().empty() && shard_bytes + b > o.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += b;
  }
  const size_t n_shards = shards.size();
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"spear_random_like", o.like}, {"spear_random_seed", std::to_string(o.seed)}};

  // A shard's buffers live until its write finishes; the write overlaps the next shard's generation.
  struct Buffers {
    std::vector<std::unique_ptr<uint16_t[]>> data;
    std::vector<TensorToWrite> list;
  };
  std::future<void> pending;
  json weight_map = json::object();
  const long total_mib = long((total + (1 << 20) - 1) >> 20);
  ProgressBar bar("generating " + (o.like.empty() ? std::string("random model") : o.like), o.progress ? total_mib : 0);
  size_t done_bytes = 0;
  for (size_t s = 0; s < n_shards; ++s) {
    const std::string fname = n_shards == 1 ? "model.safetensors" : shard_name(s, n_shards);
    auto buf = std::make_shared<Buffers>();
    for (size_t i : shards[s]) {
      const TensorSpec& t = tensors[i];
      const size_t n = t.numel();
      std::unique_ptr<uint16_t[]> d(new uint16_t[n]);  // not zeroed: first touch in the parallel fill
      if (t.init == Init::Normal) fill_normal_bf16(d.get(), n, random_tensor_key(o.seed, t.name), o.init_std);
      else std::fill(d.get(), d.get() + n, t.init == Init::Ones ? kBf16One : uint16_t(0));
      const bool output_rows = t.name == "lm_head.weight" || (c.tie_word_embeddings && t.name == "model.embed_tokens.weight");
      if (output_rows && o.decodable_vocab > 0 && o.decodable_vocab < c.vocab_size)
        std::fill(d.get() + size_t(o.decodable_vocab) * size_t(c.hidden_size), d.get() + n, uint16_t(0));
      buf->list.push_back({t.name, DType::BF16, t.shape, d.get(), t.nbytes()});
      buf->data.push_back(std::move(d));
      weight_map[t.name] = fname;
      done_bytes += t.nbytes();
      bar.update(long(done_bytes >> 20), n_shards > 1 ? fmt::format("MiB, shard {}/{}", s + 1, n_shards) : "MiB");
    }
    if (pending.valid()) pending.get();  // at most one shard being written while the next is generated
    const std::string path = (fs::path(out_dir) / fname).string();
    pending = std::async(std::launch::async, [buf, path, &metadata] { write_safetensors(path, buf->list, metadata); });
  }
  bar.update(total_mib, "MiB, writing");
  if (pending.valid()) pending.get();
  bar.finish();

  if (n_shards > 1)
    write_json(fs::path(out_dir) / "model.safetensors.index.json",
               {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
  json gen = json::object();
  if (!c.bos_token_ids.empty()) gen["bos_token_id"] = cfg_json["bos_token_id"];
  if (!c.eos_token_ids.empty()) gen["eos_token_id"] = cfg_json["eos_token_id"];
  write_json(fs::path(out_dir) / "generation_config.json", gen);
  // config.json last: a directory interrupted mid-write does not look like a loadable model.
  write_json(fs::path(out_dir) / "config.json", cfg_json);

  RandomModelResult r;
  r.parameters = total / 2;
  r.bytes = total;
  r.files = int(n_shards);
  r.seconds = std::chrono::duration<double>(clk::now() - t0).count();
  return r;
}

}  // namespace spear
