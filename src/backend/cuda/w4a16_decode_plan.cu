// The decode kernel's planner (a small time model of one launch), its tuner (each candidate plan timed at the
// first use of a launch shape, the winner kept for the process) and the entry points that pick a plan and launch
// the register-ring kernel (w4a16_decode.cu) or the bulk-copy kernel (w4a16_decode_bulk.cu).
#include <algorithm>
#include <functional>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/cuda/w4a16_decode_plan.h"
#include "backend/cuda/w4a16_internal.h"

namespace spear::cuda::w4_detail {

W4DecEc dec_ec_of(const W4EcDevice& e, int k, int base_slices, int S, int col0) {
  W4DecEc d{};
  d.A = e.A, d.B = e.B, d.W1 = e.W1, d.b1 = e.b1, d.W2 = e.W2, d.b2 = e.b2;
  d.rank = e.rank;
  d.gate_width = e.W1 ? e.gate_width : 0;
  d.epochs = static_cast<unsigned long long*>(e.scratch);
  d.zpart = reinterpret_cast<unsigned long long*>(static_cast<char*>(e.scratch) + kEcCounterBytes);
  d.ticket = reinterpret_cast<unsigned*>(static_cast<char*>(e.scratch) + 8);
  d.gz = reinterpret_cast<unsigned long long*>(static_cast<char*>(e.scratch) + kEcCounterBytes + ec_zpart_bytes(e.rank));
  d.cpr = ec_cpr(e.rank, k);
  d.cols = (base_slices + S - 1) / S;
  d.slices = d.cols * S;
  d.col0 = col0;
  return d;
}

int ec_cpr(int rank, int k) {
  const int chunks = (k + 255) / 256;
  const int cpr = (chunks + 63) / 64;
  return (rank / 8) * cpr <= kEcRing ? cpr : 0;
}

int ec_w4_gate_default(const W4Device* w, int count) {
  double bytes = 0;
  for (int i = 0; i < count; ++i) bytes += double(w[i].n_pad) * w[i].k_pad / 2;
  return bytes < double(4 << 20) ? 1 : 0;
}

// ---- decode plan: tiles per CTA R and cluster size S from a small time model (µs) of one launch:
//   waves × (latency + max(bytes / bandwidth, issue time, serial latency of a slice longer than the ring))
//   + x staging + the reductions (shared memory; cluster barriers and DSMEM when S > 1).
// The constants are rough H100/H200 figures; the choice only needs to be near the best, not exact.
DecodePlan plan_decode(int T, int m, const W4Device* w, int count, int sm_count, int force_r, int force_s,
                       const EcPlanInfo* ec) {
  const bool project = ec && ec->project;  // the W4 CTAs hold no EC state and never wait
  const int ec_rmax = ec && !project ? ec->rmax : 0, ec_gmax = ec && !project ? ec->gmax : 0;
  const DeviceFacts& dev = device_facts();
  sm_count = std::max(sm_count, 1);
  const int kblocks = w[0].k_pad / kKBlock;
  const int max_s = dev.major >= 9 ? kDecMaxCluster : 1;
  long units = 0;  // 16 × 64 weight tiles of 512 bytes
  for (int i = 0; i < count; ++i) units += long(w[i].n_pad / 16) * kblocks;
  const double bytes = double(units) * 512.0;
  constexpr double kLatency = 0.8;       // DRAM round trip under load
  constexpr double kBandwidth = 3.2e6;   // bytes / µs, whole device
  constexpr double kSmBandwidth = 45e3;  // bytes / µs one SM can pull with a few CTAs of loads in flight
  constexpr double kSmL2 = 60e3;         // bytes / µs of x staging per SM (L2 → shared memory)
  constexpr double kIssue = 7000.0;      // warp instructions / µs / SM
  const int P = dec_pipe(T, count > 0 && w[0].groups > 1);

  DecodePlan best;
  for (int R : {8, 4, 2, 1}) {
    if (force_r && R != force_r) continue;
    const int KS = kWarps / R;
    long ctas_w4 = 0;
    for (int i = 0; i < count; ++i) ctas_w4 += (w[i].n_pad / 16 + R - 1) / R;
    for (int S = 1; S <= max_s; ++S) {
      const long ctas_x = ctas_w4 + (ec ? ec->cols(S) : 0);
      if (force_s && S != std::min(force_s, max_s)) continue;
      const int KT = KS * S;
      const int kbw = (kblocks + KT - 1) / KT;
      const bool forced = force_r || force_s;
      if (!forced && S > 1 && (S - 1) * KS * kbw >= kblocks) continue;  // a CTA without k-blocks
      const int cta_cols = KS * kbw * kKBlock;
      int gmax = 0;
      for (int i = 0; i < count; ++i)
        if (w[i].groups > 1) gmax = std::max(gmax, std::min(w[i].groups, (cta_cols - 1) / w[i].group_size + 2));
      const int xs_stride = cta_cols + 8;
      const size_t smem = std::max(dec_smem_bytes(T, R, gmax, m, xs_stride, ec_rmax, ec_gmax),
                                   ec ? ec_cta_smem_bytes(m, ec->cpr_max) + ec_finish_smem_bytes(m, ec->rmax, ec->gmax)
                                      : size_t(0));
      if (smem + kDecStaticSmemMargin > dev.smem_optin) continue;
      const int resident = std::min<int>(dec_min_blocks(T, count > 0 && w[0].groups > 1),
                                         int(dev.smem_per_sm / std::max<size_t>(smem + dev.smem_reserved, 1)));
      if (resident < 1) continue;
      const long ctas = ctas_x * S;
      const long slots = long(sm_count) * resident;
      const long waves = (ctas + slots - 1) / slots;
      if (ec && !project && waves > 1) continue;
      const long in_wave = std::min(ctas, slots);
      const long sms_used = std::min<long>(in_wave, sm_count);
      const long ctas_per_sm = (in_wave + sm_count - 1) / sm_count;
      const double bw = std::min(kBandwidth, double(sms_used) * kSmBandwidth);
      const double stream = bytes / double(waves) / bw;
      const double issue = double(ctas_per_sm) * kWarps * kbw * 4.0 * (12.0 + 1.5 * T) / kIssue;
      const double serial = double((kbw + P - 1) / P - 1) * kLatency;
      double cost = double(waves) * (kLatency + std::max({stream, issue, serial}));
      cost += 0.7 * double(ctas_per_sm) * double(m) * cta_cols * 2.0 / kSmL2;  // partly under the weight loads
      if (KS > 1) cost += 0.05 + 0.01 * KS;
      if (S > 1) cost += 0.3 + 0.03 * S;
      if (cost < best.cost) best = {R, S, kbw, xs_stride, gmax, smem, cost};
    }
  }
  return best;
}

bool decode_takes(int m, const W4Device* w, int count) {
  const int T = token_tiles(m);
  if (m > kDecMaxTokens || T > 4 || count < 1 || count > kDecMaxMats) return false;
  const bool grouped = w[0].groups > 1;
  for (int i = 1; i < count; ++i)
    if ((w[i].groups > 1) != grouped || w[i].k_pad != w[0].k_pad || w[i].k != w[0].k) return false;
  return true;
}

EcPlanInfo ec_plan_info(int k, int count, const W4EcDevice* const* ec) {
  EcPlanInfo info;
  for (int i = 0; i < count; ++i) {
    if (!ec || !ec[i]) continue;
    const int cpr = ec_cpr(ec[i]->rank, k);
    info.base_slices[i] = (k + 256 * cpr - 1) / (256 * cpr);
    info.rmax = std::max(info.rmax, ec[i]->rank);
    info.cpr_max = std::max(info.cpr_max, cpr);
    info.gmax = std::max(info.gmax, ec[i]->W1 ? (ec[i]->gate_width + 3) / 4 * 4 : 0);
    ++info.n;
  }
  return info;
}

namespace {

// Tuned plans, process-wide: launch shape → (R, S).
// device, T, grouped · 65536 + count, k_pad, n_pad of each, fused ECs (rank of each, in 8 bits; gate width)
using TuneKey = std::array<int, 6 + kDecMaxMats>;
std::mutex g_tune_mu;
// The plan `best` runs only at the m it won at: the bulk-copy kernel stages all of x per CTA, so its time grows with
// m much faster than the register ring's, and a plan timed behind its predecessor (tune_decode's before) won in that
// place of the step, which other m of the same token tiles need not share (at one token the down projection follows
// the fused gate/up launch; at eight the SwiGLU kernel). Other m take `ring`, the fastest register-ring plan alone.
struct TunedPlan {
  std::pair<int, int> best, ring;  // (R, S) of the fastest plan, and of the fastest register-ring plan timed alone
  int best_gate = 0, ring_gate = 0;  // their DecodePlan::ec_w4_gate (fused ECs)
  int m = 0;                         // tokens of the timed launch
};
std::map<TuneKey, TunedPlan> g_tuned;

// Launches of up to 8 tokens are tuned at each m: they share one token tile, but the fastest plan of a decode step
// is not the same at one token and at eight (Llama-3.1-8B shape: the plans tuned at one token ran the batch-8 step
// 10% slower than those that win there). Beyond 8, per token tile. SPEAR_W4_TUNE_EXACT_M=0: per token tile always.
int tune_class(int m) {
  static const bool exact = [] {
    const char* e = std::getenv("SPEAR_W4_TUNE_EXACT_M");
    return !(e && std::string(e) == "0");
  }();
  return exact && m <= 8 ? m : token_tiles(m);
}

// W4GemmOptions::ec_gate (forced: 1-5) as DecodePlan::ec_w4_gate (1 -> 1, 2 -> 0, 3-5 -> clusters 2-4).
int forced_gate(int option) { return option == 1 ? 1 : option == 2 ? 0 : option - 1; }

TuneKey tune_key(int m, const W4Device* w, int count, const EcPlanInfo* ec = nullptr) {
  TuneKey key{};
  if (ec)
    for (int i = 0; i < kDecMaxMats; ++i) key[4 + kDecMaxMats] |= (ec->base_slices[i] ? 1 : 0) << i;
  if (ec) key[5 + kDecMaxMats] = ec->rmax * 4096 + ec->gmax;
  key[0] = device_facts().device;
  key[1] = tune_class(m);
  key[2] = (w[0].groups > 1 ? w[0].group_size : 0) * 65536 + count;
  key[3] = w[0].k_pad;
  for (int i = 0; i < count; ++i) key[4 + i] = w[i].n_pad;
  return key;
}

// The plan a launch runs: forced by the options, else the tuned one for this shape, else the time model's (also
// when a forced or tuned plan does not fit). R == 0: none fits.
// allow_general: a tuned kGeneralPlan comes back as R == kGeneralPlan (else the time model's plan replaces it).
DecodePlan choose_plan(int m, const W4Device* w, int count, int sm_count, const W4GemmOptions& o,
                       const EcPlanInfo* ec = nullptr, bool allow_general = false) {
  const int T = token_tiles(m);
  int fr = o.decode_rows, fs = o.decode_splits;
  int gate = ec_w4_gate_default(w, count);
  if (!fr && !fs) {
    std::lock_guard<std::mutex> lock(g_tune_mu);
    const auto it = g_tuned.find(tune_key(m, w, count, ec));
    if (it != g_tuned.end()) {
      const TunedPlan& t = it->second;
      // A general-kernel win stands only where the caller can run it; elsewhere (the mirrored TP launch) the
      // fastest decode plan.
      const bool ring = m != t.m || (t.best.first == kGeneralPlan && !allow_general);
      std::tie(fr, fs) = ring ? t.ring : t.best;
      gate = ring ? t.ring_gate : t.best_gate;
    }
  }
  if (o.ec_gate) gate = forced_gate(o.ec_gate);
  if (fr == kGeneralPlan) {
    DecodePlan general;
    general.R = kGeneralPlan;
    return general;
  }
  if (fr == kBulkPlan) {
    if (ec ? bulk_ec_takes(m, w, count, *ec, sm_count, gate) : bulk_takes(m, w, count)) {
      DecodePlan bulk;
      bulk.R = kBulkPlan;
      bulk.S = 1;
      bulk.ec_w4_gate = gate;
      return bulk;
    }
    fr = fs = 0;
  }
  DecodePlan plan = plan_decode(T, m, w, count, sm_count, fr, fs, ec);
  if (plan.R == 0 && (fr || fs)) plan = plan_decode(T, m, w, count, sm_count, 0, 0, ec);
  plan.ec_w4_gate = ec_cluster_size(gate) ? 1 : gate;  // ECs in clusters are the bulk kernel's
  return plan;
}

}  // namespace

// The decode kernel over count matrices sharing x; false when no plan fits (the caller takes the general path).
bool launch_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, const __nv_bfloat16* const* bias,
                   __nv_bfloat16* const* y, int sm_count, const W4GemmOptions& o, cudaStream_t stream, bool* general) {
  if (general) *general = false;
  if (!decode_takes(m, w, count)) return false;
  const DecodePlan plan = choose_plan(m, w, count, sm_count, o, nullptr, general != nullptr);
  if (plan.R == kGeneralPlan) *general = true;
  if (plan.R == 0 || plan.R == kGeneralPlan) return false;
  if (plan.R == kBulkPlan)
    launch_bulk(x, m, w, count, bias, y, o, stream);
  else
    launch_plan(plan, x, m, w, count, bias, y, o, stream);
  return true;
}

bool launch_decode_mirrored(const __nv_bfloat16* x, int m, const W4Device& w, const __nv_bfloat16* bias,
                            __nv_bfloat16* y, const W4PeerMirror& mirror, int sm_count, const W4GemmOptions& o,
                            cudaStream_t stream) {
  if (!decode_takes(m, &w, 1) || w.n % 8 != 0 || m > mirror.max_rows) return false;
  DecodePlan plan = choose_plan(m, &w, 1, sm_count, o);
  if (plan.R == kBulkPlan) plan = plan_decode(token_tiles(m), m, &w, 1, sm_count, 0, 0);  // no dual-write there
  if (plan.R == 0) return false;
  launch_plan(plan, x, m, &w, 1, &bias, &y, o, stream, nullptr, nullptr, &mirror);
  return true;
}

bool ec_fusable(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  if (!decode_takes(m, w, count) || w[0].k % 8 != 0) return false;
  for (int i = 0; i < count; ++i) {
    if (!ec || !ec[i]) continue;
    const W4EcDevice& e = *ec[i];
    if (e.rank < 8 || e.rank % 8 || e.rank > kW4EcMaxRank || e.gate_width < 0 || e.gate_width > kW4EcMaxGate ||
        ec_cpr(e.rank, w[0].k) == 0 || !e.A || !e.B || !e.scratch ||
        (e.gate_width > 0 && e.W1 && (!e.b1 || !e.W2 || !e.b2)))
      return false;
  }
  return true;
}

bool launch_decode_ec(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4EcDevice* const* ec,
                      const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count, const W4GemmOptions& o,
                      cudaStream_t stream) {
  if (!ec_fusable(m, w, count, ec) || (reinterpret_cast<uintptr_t>(x) & 15) != 0) return false;
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  const DecodePlan plan = choose_plan(m, w, count, sm_count, o, info.n ? &info : nullptr);
  if (plan.R == 0) return false;
  if (plan.R == kBulkPlan)  // with compensators only where one wave holds every CTA (bulk_ec_takes)
    launch_bulk(x, m, w, count, bias, y, o, stream, nullptr, ec, info.n ? &info : nullptr, plan.ec_w4_gate);
  else
    launch_plan(plan, x, m, w, count, bias, y, o, stream, ec, info.n ? &info : nullptr);
  return true;
}

// The plain launch's plan (tuned or modelled) with the EC CTAs added: its W4 CTAs run as without the compensators.
bool launch_decode_ec_project(const __nv_bfloat16* x, int m, const W4Device* w, int count,
                              const W4EcDevice* const* ecs, const __nv_bfloat16* const* bias,
                              __nv_bfloat16* const* y, float* const* z, bool gated, int sm_count,
                              const W4GemmOptions& o, cudaStream_t stream) {
  if (!ec_fusable(m, w, count, ecs) || (reinterpret_cast<uintptr_t>(x) & 15) != 0) return false;
  EcPlanInfo info = ec_plan_info(w[0].k, count, ecs);
  if (info.n == 0) return false;
  info.project = true;
  info.project_gated = gated;
  const DecodePlan plain = choose_plan(m, w, count, sm_count, o);
  if (plain.R == 0) return false;
  if (plain.R == kBulkPlan && bulk_project_takes(m, w, count, info)) {
    launch_bulk(x, m, w, count, bias, y, o, stream, nullptr, ecs, &info, 0, z);
    return true;
  }
  const int T = token_tiles(m);
  DecodePlan plan;
  if (plain.R != kBulkPlan) plan = plan_decode(T, m, w, count, sm_count, plain.R, plain.S, &info);
  if (plan.R == 0) plan = plan_decode(T, m, w, count, sm_count, 0, 0, &info);
  if (plan.R == 0) return false;
  launch_plan(plan, x, m, w, count, bias, y, o, stream, ecs, &info, nullptr, nullptr, z);
  return true;
}

W4FuseDev fuse_of(const W4Fusion* f) {
  W4FuseDev d{};
  if (!f) return d;
  d.residual = f->residual ? 1 : 0;
  d.norm_w = f->norm_out ? f->norm_w : nullptr;
  d.norm_out = f->norm_out;
  d.eps = f->eps;
  d.swiglu_out = f->swiglu_out;
  d.counters = f->counters;
  return d;
}

bool decode_fusable(int m, const W4Device* w, int count, const W4Fusion& f, __nv_bfloat16* const* y,
                    const W4EcDevice* const* ec) {
  auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  if (m < 1 || m > kFusedMaxTokens || !decode_takes(m, w, count)) return false;
  if (ec && !ec_fusable(m, w, count, ec)) return false;
  if ((f.norm_out || f.swiglu_out) && !f.counters) return false;
  if (f.norm_out && (count != 1 || w[0].n % 8 || !f.norm_w || !aligned(f.norm_w) || !aligned(f.norm_out) ||
                     !aligned(y[0]) || f.norm_out == y[0]))
    return false;
  if (f.swiglu_out && (count != 2 || f.residual || f.norm_out || w[0].n != w[1].n ||
                       w[0].n_pad / 16 > kFusedMaxPairTiles || f.swiglu_out == y[1]))
    return false;
  return true;
}

// The plan of the launch without the fusions (tuned on the plain launch, or on the compensated one with ec), so that
// the GEMM sums in the same order. The EC CTAs of a compensated launch take no part in the tails: they leave once
// their slice of A·x is stored, and the norm tail counts only the W4 CTAs.
bool launch_decode_fused(const __nv_bfloat16* x, int m, const W4Device* w, int count, const W4Fusion& f,
                         const __nv_bfloat16* const* bias, __nv_bfloat16* const* y, int sm_count,
                         const W4GemmOptions& o, cudaStream_t stream, const W4EcDevice* const* ec) {
  if (!decode_fusable(m, w, count, f, y, ec)) return false;
  if (ec && (reinterpret_cast<uintptr_t>(x) & 15) != 0) return false;
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  const EcPlanInfo* ei = ec && info.n ? &info : nullptr;
  const DecodePlan plan = choose_plan(m, w, count, sm_count, o, ei);
  if (plan.R == 0) return false;
  if (plan.R == kBulkPlan)
    launch_bulk(x, m, w, count, bias, y, o, stream, &f, ei ? ec : nullptr, ei, plan.ec_w4_gate);
  else
    launch_plan(plan, x, m, w, count, bias, y, o, stream, ei ? ec : nullptr, ei, nullptr, &f);
  return true;
}

bool tune_decode(const __nv_bfloat16* x, int m, const W4Device* w, int count, __nv_bfloat16* const* y, void* flush,
                 size_t flush_bytes, int sm_count, cudaStream_t stream, int reps, const W4EcDevice* const* ec,
                 const W4Fusion* fusion, const std::function<void()>* before,
                 const std::function<void()>* general) {
  if (!decode_takes(m, w, count)) return false;
  if (ec && !ec_fusable(m, w, count, ec)) return false;
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  const EcPlanInfo* ei = info.n ? &info : nullptr;
  const int T = token_tiles(m);
  const DeviceFacts& dev = device_facts();
  const W4GemmOptions o = w4a16_get_options();
  cudaEvent_t ev[2];
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[0]));
  SPEAR_CUDA_CHECK(cudaEventCreate(&ev[1]));
  // Median µs of reps calls of launch after one warm-up call (the first use of an instance), L2 flushed before each;
  // with before, of the predecessor's replay and the call behind it.
  auto median_us = [&](auto&& launch, bool behind = false) {
    if (behind) (*before)();
    launch();
    std::vector<float> ts;
    for (int r = 0; r < reps; ++r) {
      if (flush) SPEAR_CUDA_CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, stream));
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[0], stream));
      if (behind) (*before)();
      launch();
      SPEAR_CUDA_CHECK(cudaEventRecord(ev[1], stream));
      SPEAR_CUDA_CHECK(cudaEventSynchronize(ev[1]));
      float ms = 0.f;
      SPEAR_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      ts.push_back(ms);
    }
    std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
    return 1e3 * double(ts[ts.size() / 2]);
  };
  double best_us = 1e300;
  std::pair<int, int> best{0, 0};
  int best_gate = 0;
  // SPEAR_W4_TUNE_LOG=1: every timed plan on stderr (m, the matrices' n × k, the ECs' ranks).
  static const bool log = [] {
    const char* e = std::getenv("SPEAR_W4_TUNE_LOG");
    return e && std::string(e) == "1";
  }();
  auto log_shape = [&] {
    std::string d = "w4 tune m=" + std::to_string(m);
    for (int i = 0; i < count; ++i)
      d += (i ? "+" : " ") + std::to_string(w[i].n) + "x" + std::to_string(w[i].k) +
           (ei && ei->base_slices[i] ? "/ec" : "");
    return fusion ? d + (fusion->swiglu_out ? " +swiglu" : " +norm") : d;
  };
  // Every plan alone; with a predecessor also behind it (the plan for this m: `best`), the alone times picking the
  // ring plan for other m.
  double ctx_best_us = 1e300;
  std::pair<int, int> ctx_best{0, 0};
  int ctx_gate = 0;
  auto time_behind = [&](auto&& launch, std::pair<int, int> plan, int gate, const char* what) {
    if (!before) return;
    const double us = median_us(launch, true);
    if (us < ctx_best_us) ctx_best_us = us, ctx_best = plan, ctx_gate = gate;
    if (log)
      std::fprintf(stderr, "%s %s gate %d, after its predecessor: %.2f us\n", log_shape().c_str(), what, gate, us);
  };
  // With fused ECs every plan is timed with the slice sum and the gate in the W4 CTAs and in the last EC CTA, the
  // bulk kernel also with the ECs in clusters of 8, 16 and 4 (the options can force one); which wins depends on the
  // launch's size.
  std::vector<int> gates = {0}, bulk_gates = {0};
  if (ei && o.ec_gate) {
    bulk_gates = {forced_gate(o.ec_gate)};
    gates = {ec_cluster_size(bulk_gates[0]) ? 1 : bulk_gates[0]};
  } else if (ei) {
    // SPEAR_W4_EC_CLUSTERS=0: not in clusters (A/B runs).
    static const bool clusters = [] {
      const char* e = std::getenv("SPEAR_W4_EC_CLUSTERS");
      return !(e && std::string(e) == "0");
    }();
    gates = {1, 0};
    bulk_gates = {1, 0};
    if (clusters)
      for (int g : kEcClusterGates) bulk_gates.push_back(g);
  }
  // SPEAR_W4_TUNE_MAX_CLUSTER: the largest cluster (split along k) the tuner tries (A/B runs).
  static const int max_cluster = [] {
    const char* e = std::getenv("SPEAR_W4_TUNE_MAX_CLUSTER");
    return e && *e ? std::clamp(std::atoi(e), 1, kDecMaxCluster) : kDecMaxCluster;
  }();
  for (int R : {1, 2, 4, 8})
    for (int S = 1; S <= (dev.major >= 9 ? max_cluster : 1); ++S) {
      DecodePlan plan = plan_decode(T, m, w, count, sm_count, R, S, ei);
      if (plan.R != R || plan.S != S) continue;
      const int kblocks = w[0].k_pad / kKBlock, KS = kWarps / R;
      if (S > 1 && (S - 1) * KS * plan.kbw >= kblocks) continue;  // a CTA without k-blocks
      for (int gate : gates) {
        plan.ec_w4_gate = gate;
        double us = 0.0;
        auto run = [&] { launch_plan(plan, x, m, w, count, nullptr, y, o, stream, ec, ei, nullptr, fusion); };
        try {
          us = median_us(run);
        } catch (const Error&) {  // a plan the device cannot launch after all (cluster resources): skip it
          (void)cudaGetLastError();
          SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
          break;
        }
        if (us < best_us) best_us = us, best = {R, S}, best_gate = gate;
        if (log) std::fprintf(stderr, "%s R%dS%d gate %d: %.2f us\n", log_shape().c_str(), R, S, gate, us);
        const std::string name = "R" + std::to_string(R) + "S" + std::to_string(S);
        time_behind(run, std::pair<int, int>{R, S}, gate, name.c_str());
      }
    }
  bool bulk_wins = false;
  int bulk_gate = 0;
  for (int gate : bulk_gates) {
    if (!o.bulk || !(ei ? bulk_ec_takes(m, w, count, *ei, sm_count, gate) : bulk_takes(m, w, count))) continue;
    auto run = [&] { launch_bulk(x, m, w, count, nullptr, y, o, stream, fusion, ec, ei, gate); };
    double us = 0.0;
    try {
      us = median_us(run);
    } catch (const Error&) {  // clusters the device cannot place after all: skip them
      (void)cudaGetLastError();
      SPEAR_CUDA_CHECK(cudaStreamSynchronize(stream));
      continue;
    }
    if (us < best_us) best_us = us, bulk_wins = true, bulk_gate = gate;
    if (log) std::fprintf(stderr, "%s bulk gate %d: %.2f us\n", log_shape().c_str(), gate, us);
    time_behind(run, std::pair<int, int>{kBulkPlan, 1}, gate, "bulk");
  }
  // The general kernel (split-K through the caller's workspace), for plain launches of more than 16 tokens: at 32
  // tokens it beats every decode plan on some shapes (8B down_proj) and loses on others (the 1B shapes).
  bool general_wins = false;
  if (general && *general && !ei && !fusion && m > 16) {
    const double us = median_us(*general);
    if (us < best_us) best_us = us, general_wins = true, bulk_wins = false;
    if (log) std::fprintf(stderr, "%s general: %.2f us\n", log_shape().c_str(), us);
  }
  cudaEventDestroy(ev[0]);
  cudaEventDestroy(ev[1]);
  if (best.first == 0) return false;
  std::lock_guard<std::mutex> lock(g_tune_mu);
  TunedPlan& t = g_tuned[tune_key(m, w, count, ei)];
  t.ring = best;
  t.ring_gate = best_gate;
  t.best = general_wins ? std::pair<int, int>{kGeneralPlan, 0} : bulk_wins ? std::pair<int, int>{kBulkPlan, 1} : best;
  t.best_gate = bulk_wins ? bulk_gate : best_gate;
  if (ctx_best.first != 0) t.best = ctx_best, t.best_gate = ctx_gate;
  t.m = m;
  return true;
}

std::pair<int, int> decode_plan(int m, const W4Device* w, int count, int sm_count) {
  if (!decode_takes(m, w, count)) return {0, 0};
  const DecodePlan plan = choose_plan(m, w, count, sm_count, w4a16_get_options(), nullptr, true);
  if (plan.R == kGeneralPlan) return {0, 0};  // the general kernel
  return {plan.R, plan.S};
}

bool decode_tuned(int m, const W4Device* w, int count, const W4EcDevice* const* ec) {
  if (!decode_takes(m, w, count) || (ec && !ec_fusable(m, w, count, ec))) return true;  // nothing to tune
  const EcPlanInfo info = ec_plan_info(w[0].k, count, ec);
  std::lock_guard<std::mutex> lock(g_tune_mu);
  return g_tuned.count(tune_key(m, w, count, info.n ? &info : nullptr)) > 0;
}

void clear_tuning() {
  std::lock_guard<std::mutex> lock(g_tune_mu);
  g_tuned.clear();
}

}  // namespace spear::cuda::w4_detail
