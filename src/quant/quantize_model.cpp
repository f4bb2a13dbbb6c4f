#include "quant/quantize_model.h"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/calibration.h"
#include "tokenizer/tokenizer.h"

namespace spear {

namespace {

using clk = std::chrono::steady_clock;

const char* kModules[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

// Modules that read the same input share one Hessian: q/k/v read the attention norm's output, gate/up the
// MLP norm's output.
std::string hessian_key(const std::string& module) {
  if (module == "self_attn.k_proj" || module == "self_attn.v_proj") return "self_attn.q_proj";
  if (module == "mlp.up_proj") return "mlp.gate_proj";
  return module;
}

std::vector<float> read_weight(const Checkpoint& ck, const std::string& name, int out, int in) {
  const TensorView& t = ck.get(name + ".weight");
  if (t.shape != std::vector<int64_t>{out, in}) fail("{}: '{}.weight' has shape {}, expected [{}, {}]", ck.dir(), name, t.shape_str(), out, in);
  return t.to_f32();
}

std::unique_ptr<Linear>& linear_slot(DecoderLayer& L, const std::string& module) {
  if (module == "self_attn.q_proj") return L.q;
  if (module == "self_attn.k_proj") return L.k;
  if (module == "self_attn.v_proj") return L.v;
  if (module == "self_attn.o_proj") return L.o;
  if (module == "mlp.gate_proj") return L.gate;
  if (module == "mlp.up_proj") return L.up;
  return L.down;
}

}  // namespace

CalibrationSet make_calibration_set(Model& model, const std::string& model_dir, const std::string& calib_file,
                                    int samples, int len, uint64_t seed) {
  if (!calib_file.empty()) {
    Tokenizer tok = Tokenizer::from_dir(model_dir);
    return calibration_from_text(tok, calib_file, samples, len, seed);
  }
  // Sampling needs only the BOS id: from the tokenizer when there is one, else from config.json.
  std::optional<int32_t> bos;
  if (std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json"))
    bos = Tokenizer::from_dir(model_dir).bos_id();
  if (!bos && !model.config().bos_token_ids.empty()) bos = model.config().bos_token_ids[0];
  if (!bos) fail("{}: no BOS token to sample calibration data from; pass --calib FILE", model_dir);
  return calibration_from_model(model, *bos, samples, len, seed);
}

QuantizeResult quantize_model(const std::string& model_dir, const std::string& out_dir, const QuantizeOptions& o) {
  auto t0 = clk::now();
  if (std::filesystem::exists(std::filesystem::path(out_dir) / "config.json") &&
      std::filesystem::equivalent(model_dir, out_dir))
    fail("output directory {} is the source model directory", out_dir);
  QuantizedWeights q = quantize_weights(model_dir, o);
  write_package(out_dir, model_dir, q.manifest, q.modules);
  QuantizeResult r;
  r.manifest = q.manifest;
  r.quantized_params = q.quantized_params;
  r.calibration_seconds = q.calibration_seconds;
  r.package_bytes = std::filesystem::file_size(std::filesystem::path(out_dir) / "model.safetensors");
  r.source_bytes = Checkpoint(model_dir).total_bytes();
  r.seconds = std::chrono::duration<double>(clk::now() - t0).count();
  return r;
}

QuantizedWeights quantize_weights(const std::string& model_dir, const QuantizeOptions& o, const CalibrationSet* given) {
  if (o.method != "rtn" && o.method != "gptq") fail("unknown quantization method '{}' (rtn, gptq)", o.method);
  if (o.params.bits < 2 || o.params.bits > 8) fail("--bits must be in 2..8, got {}", o.params.bits);
  if (o.params.group_size == 0 || o.params.group_size < -1) fail("--group must be -1 or positive, got {}", o.params.group_size);

  ModelConfig cfg = load_config(model_dir);
  Checkpoint ck(model_dir);
  if (is_package(model_dir)) fail("{} is already a quantized package; quantize the original checkpoint", model_dir);
  QuantizedWeights r;
  PackageManifest& m = r.manifest;
  m.method = o.method;
  m.params = o.params;
  m.container_bits = o.params.bits <= 4 ? 4 : 8;
  m.tool_version = SPEAR_VERSION;
  m.source_model = std::filesystem::path(model_dir).lexically_normal().filename().string();
  if (m.source_model.empty()) m.source_model = std::filesystem::path(model_dir).parent_path().filename().string();
  std::map<std::string, PackedQuantWeights>& quantized = r.modules;
  auto dims = [&](const std::string& mod, int& out, int& in) {
    const int H = cfg.hidden_size, I = cfg.intermediate_size;
    if (mod == "self_attn.q_proj") out = cfg.q_dim(), in = H;
    else if (mod == "self_attn.k_proj" || mod == "self_attn.v_proj") out = cfg.kv_dim(), in = H;
    else if (mod == "self_attn.o_proj") out = H, in = cfg.q_dim();
    else if (mod == "mlp.down_proj") out = H, in = I;
    else out = I, in = H;
  };

  if (o.method == "rtn") {
    ProgressBar bar("quantizing (rtn)", cfg.num_layers * 7);
    int done = 0;
    for (int li = 0; li < cfg.num_layers; ++li)
      for (const char* mod : kModules) {
        const std::string name = "model.layers." + std::to_string(li) + "." + mod;
        int out, in;
        dims(mod, out, in);
        std::vector<float> w = read_weight(ck, name, out, in);
        quantized[name] = pack_quantized(rtn_quantize(w.data(), out, in, o.params));
        m.quantized_modules.push_back(name);
        r.quantized_params += size_t(out) * in;
        bar.update(++done);
      }
  } else {
    CpuBackend be;
    auto model = Model::load(model_dir, be);
    auto tc = clk::now();
    CalibrationSet own;
    if (!given) own = make_calibration_set(*model, model_dir, o.calib_file, o.calib_samples, o.calib_len, o.seed);
    const CalibrationSet& calib = given ? *given : own;
    r.calibration_seconds = std::chrono::duration<double>(clk::now() - tc).count();
    m.calibration_source = calib.source;
    m.calibration_file = calib.file;
    m.calibration_samples = int(calib.sequences.size());
    m.calibration_len = calib.sequences.empty() ? 0 : int(calib.sequences[0].size());
    m.seed = calib.seed;
    m.data_hash = calib.hash();

    // The residual stream of every calibration chunk, carried from layer to layer.
    const int n = int(calib.sequences.size()), chunk = std::max(1, o.chunk_sequences);
    struct Chunk {
      Batch batch;
      Tensor x;
    };
    std::vector<Chunk> chunks;
    for (int s0 = 0; s0 < n; s0 += chunk) {
      Chunk c;
      for (int s = s0; s < std::min(n, s0 + chunk); ++s) {
        const auto& seq = calib.sequences[size_t(s)];
        c.batch.seqs.push_back({int(c.batch.tokens.size()), int(seq.size()), 0, s - s0});
        c.batch.tokens.insert(c.batch.tokens.end(), seq.begin(), seq.end());
      }
      c.x = model->embed(c.batch);
      chunks.push_back(std::move(c));
    }
    auto cache = model->make_kv_cache(chunk, m.calibration_len);
    ProgressBar bar("quantizing (gptq)", cfg.num_layers);
    for (int li = 0; li < cfg.num_layers; ++li) {
      const std::string prefix = "model.layers." + std::to_string(li) + ".";
      std::map<std::string, std::vector<double>> H;
      std::map<std::string, long> seen;
      TapFn taps = [&](const std::string& name, TapPoint pt, const Tensor& t) {
        if (pt != TapPoint::Input || name.compare(0, prefix.size(), prefix) != 0) return;
        const std::string mod = name.substr(prefix.size());
        if (hessian_key(mod) != mod) return;  // shares its input with another module
        auto& h = H[mod];
        if (h.empty()) h.assign(size_t(t.cols) * t.cols, 0.0);
        accumulate_hessian(t.ptr<float>(), int(t.rows), int(t.cols), h, seen[mod]);
      };
      for (auto& c : chunks) {  // pass 1: inputs of this (full-precision) layer, after quantized earlier layers
        Tensor x = be.alloc(c.x.rows, c.x.cols);
        std::memcpy(x.data, c.x.data, c.x.nbytes());
        model->run_layer(li, x, c.batch, *cache, &taps);
      }
      for (const char* mod : kModules) {
        const std::string name = prefix + mod;
        int out, in;
        dims(mod, out, in);
        std::vector<float> w = read_weight(ck, name, out, in);
        QuantizedMatrix q = gptq_quantize(w.data(), out, in, H.at(hessian_key(mod)).data(), o.params, o.gptq);
        PackedQuantWeights packed = pack_quantized(q);
        std::vector<float> bias;
        if (ck.has(name + ".bias")) bias = ck.get(name + ".bias").to_f32();
        linear_slot(model->layers()[size_t(li)], mod) = be.make_quant_linear(name, packed, bias);
        quantized[name] = std::move(packed);
        m.quantized_modules.push_back(name);
        r.quantized_params += size_t(out) * in;
      }
      for (auto& c : chunks) model->run_layer(li, c.x, c.batch, *cache);  // pass 2: through the quantized layer
      bar.update(li + 1);
    }
  }
  return r;
}

}  // namespace spear
