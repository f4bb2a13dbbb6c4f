// spear: quantize, diagnose, compensate, evaluate and serve 4-bit LLMs.
#include <filesystem>
#include <cstdio>

#include <CLI/CLI.hpp>
#include <omp.h>

#include "cli/common.h"
#include "core/error.h"

namespace spear::cli {

void add_model_option(CLI::App* app, CommonOptions& o) {
  app->add_option("--model,-m", o.model_dir, "Model directory: a Hugging Face checkpoint (config.json, "
                                              "*.safetensors, tokenizer.json) or a SPEAR package")
      ->required()
      ->check(CLI::ExistingDirectory);
}

void add_json_option(CLI::App* app, CommonOptions& o) {
  app->add_flag("--json", o.json, "Print one JSON object on stdout instead of text");
}

void add_runtime_options(CLI::App* app, CommonOptions& o) {
  app->add_option("--threads,-t", o.threads, "CPU threads for GEMMs and kernels (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--device", o.device, "Compute device: cpu (fp32) or cuda (bf16 activations, first GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app->add_option("--ec-path", o.ec_path,
                  "How error compensators run on --device cuda: auto (the dispatch table, else fused for <= 32 "
                  "tokens and overlapped above), naive (separate kernels), fused (inside the W4 decode kernel; "
                  "naive where it cannot), overlapped (second stream beside the GEMM)")
      ->check(CLI::IsMember({"auto", "naive", "fused", "overlapped"}))
      ->capture_default_str();
  app->add_option("--ec-dispatch", o.ec_dispatch,
                  "EC dispatch table written by `spear tune --device cuda` (default: ec_dispatch.json in the model "
                  "directory when present, else the built-in rule)");
  app->add_flag("--verbose,-v", o.verbose, "Report decisions on stderr (which EC path each compensated linear takes)");
}

std::unique_ptr<Backend> make_device_backend(const CommonOptions& o, int rank);

std::string read_text_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail("cannot open {}", path);
  std::string s;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  std::fclose(f);
  return s;
}

}  // namespace spear::cli

#include "backend/cpu/cpu_backend.h"
#ifdef SPEAR_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#endif

std::unique_ptr<spear::Backend> spear::cli::make_backend(const CommonOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  std::shared_ptr<ProcessGroup> pg = start_tensor_parallel(o);
  std::unique_ptr<Backend> be = make_device_backend(o, pg ? pg->rank() : 0);
  if (pg) {
    // Only where the user chose: SPEAR_TP_REDUCE (read by the backend) stays in force under the default.
    if (o.tp_reduce != "auto") be->set_tp_reduce(parse_tp_reduce(o.tp_reduce, "--tp-reduce"));
    be->set_process_group(std::move(pg));
  }
  return be;
}

std::unique_ptr<spear::Backend> spear::cli::make_device_backend(const CommonOptions& o, int rank) {
  if (o.device == "cuda") {
#ifdef SPEAR_HAVE_CUDA
    // A rank's GPU: ranks on one host take one GPU each.
    auto b = std::make_unique<spear::cuda::CudaBackend>(rank % spear::cuda::device_count());
    b->set_verbose(o.verbose);
    b->set_ec_path(spear::parse_ec_path(o.ec_path));
    std::string table = o.ec_dispatch;
    if (table.empty() && !o.model_dir.empty() && std::filesystem::exists(o.model_dir + "/ec_dispatch.json"))
      table = o.model_dir + "/ec_dispatch.json";
    if (!table.empty()) {
      auto t = std::make_shared<spear::EcDispatchTable>(spear::EcDispatchTable::load(table));
      if (o.verbose)
        std::fprintf(stderr, "ec dispatch: table %s (%zu entries, measured on %s)\n", table.c_str(), t->entries.size(),
                     t->device.c_str());
      b->set_ec_dispatch(std::move(t));
    }
    return b;
#else
    spear::fail("--device cuda: this spear was built without CUDA (configure with -DSPEAR_CUDA=ON and nvcc present)");
#endif
  }
  return std::make_unique<CpuBackend>();
}

int main(int argc, char** argv) {
  spear::cli::g_argv.assign(argv, argv + argc);
  // Errors of ranks started by a local rank 0 say which rank they come from.
  const char* tp_rank = std::getenv("SPEAR_TP_RANK");
  const std::string who = tp_rank ? std::string("spear[rank ") + tp_rank + "]" : "spear";
  int rc = 0;
  CLI::App app{"SPEAR: 4-bit LLM inference with token-gated error compensators"};
  app.set_version_flag("--version", std::string("spear ") + SPEAR_VERSION);
  app.require_subcommand(1);
  spear::cli::register_ppl(app);
  spear::cli::register_generate(app);
  spear::cli::register_tokenize(app);
  spear::cli::register_inspect(app);
  spear::cli::register_quantize(app);
  spear::cli::register_diagnose(app);
  spear::cli::register_calibrate(app);
  spear::cli::register_eval(app);
  spear::cli::register_make_model(app);
  spear::cli::register_bench(app);
  spear::cli::register_serve(app);
  spear::cli::register_tune(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const spear::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", who.c_str(), e.what());
    rc = 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory\n", who.c_str());
    rc = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", who.c_str(), e.what());
    rc = 1;
  }
  spear::cli::finish_tensor_parallel();
  return rc;
}
