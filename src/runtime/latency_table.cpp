#include "runtime/latency_table.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear {

namespace {

// Pool adjacent violators: the least-squares non-decreasing fit, so that noise (another process on the machine)
// cannot make a larger batch look cheaper and the chunk search can rely on monotone predictions.
std::vector<double> monotone(const std::vector<double>& y) {
  std::vector<double> val;
  std::vector<int> cnt;
  for (double v : y) {
    val.push_back(v);
    cnt.push_back(1);
    while (val.size() > 1 && val[val.size() - 2] > val.back()) {
      const double merged = (val[val.size() - 2] * cnt[cnt.size() - 2] + val.back() * cnt.back()) /
                            double(cnt[cnt.size() - 2] + cnt.back());
      cnt[cnt.size() - 2] += cnt.back();
      val[val.size() - 2] = merged;
      val.pop_back();
      cnt.pop_back();
    }
  }
  std::vector<double> out;
  for (size_t i = 0; i < val.size(); ++i) out.insert(out.end(), size_t(cnt[i]), val[i]);
  return out;
}

}  // namespace

double LatencyTable::predict_ms(int n) const {
  SPEAR_CHECK(!tokens.empty() && tokens.size() == ms.size(), "latency table: empty");
  if (tokens.size() == 1) return ms[0] * double(std::max(n, 1)) / double(tokens[0]);
  size_t i = 1;
  while (i + 1 < tokens.size() && tokens[i] < n) ++i;  // segment [i - 1, i], or the last one beyond the end
  const double t0 = tokens[i - 1], t1 = tokens[i];
  const double slope = (ms[i] - ms[i - 1]) / (t1 - t0);
  return std::max(0.0, ms[i - 1] + slope * (double(n) - t0));
}

namespace {

// The largest c in [0, hi] with fits(c), 0 when none; fits must not turn true again once false.
int largest_fitting(int hi, const std::function<bool(int)>& fits) {
  int lo = 0;  // invariant: lo fits (or is 0)
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

double attention_kpairs(const std::vector<SeqWork>& batch, int& total) {
  double pairs = 0;
  total = 0;
  for (const SeqWork& w : batch) {
    pairs += double(w.n) * (double(w.pos0) + (double(w.n) + 1) / 2);
    total += w.n;
  }
  return pairs / 1000.0;
}

}  // namespace

double LatencyTable::predict_ms(const std::vector<SeqWork>& batch) const {
  int total = 0;
  const double kpairs = attention_kpairs(batch, total);
  if (total == 0) return 0;
  const double fresh = double(total) * (double(total) + 1) / 2 / 1000.0;  // in the table's own measurement
  const int seqs = int(std::count_if(batch.begin(), batch.end(), [](const SeqWork& w) { return w.n > 0; }));
  return predict_ms(total) + ms_per_kpair * std::max(0.0, kpairs - fresh) + ms_per_seq * std::max(0, seqs - 1);
}

int LatencyTable::largest_chunk(const std::vector<SeqWork>& fixed, const std::vector<SeqWork>& prefill,
                                int max_chunk, double budget_ms) const {
  auto with = [&](int c) {
    std::vector<SeqWork> b = fixed;
    for (const SeqWork& p : prefill) {
      if (c <= 0) break;
      const int n = std::min(c, p.n);
      b.push_back({n, p.pos0});
      c -= n;
    }
    return predict_ms(b);
  };
  int pending = 0;
  for (const SeqWork& p : prefill) pending += p.n;
  return largest_fitting(std::min(max_chunk, pending), [&](int c) { return with(c) <= budget_ms; });
}

int LatencyTable::largest_chunk(int fixed, int max_chunk, double budget_ms) const {
  return largest_fitting(max_chunk, [&](int c) { return predict_ms(fixed + c) <= budget_ms; });
}

int SloCalibrator::size_class(int tokens) {
  int c = 0;
  while (c < kClasses - 1 && (1 << c) < tokens) ++c;
  return c;
}

int SloCalibrator::class_max_tokens(int c) {
  return c >= kClasses - 1 ? std::numeric_limits<int>::max() : 1 << c;
}

void SloCalibrator::add(int tokens, double predicted_ms, double measured_ms, double slo_ms) {
  if (!(predicted_ms > 0) || !(measured_ms >= 0)) return;
  const double r = std::clamp(measured_ms / predicted_ms, 0.25, 4.0);
  mean_ = 0.9 * mean_ + 0.1 * r;
  if (predicted_ms * scale(tokens) < 0.5 * slo_ms) return;
  Window& w = classes_[size_class(tokens)];
  if (w.ratios.size() < kWindow) {
    w.ratios.push_back(r);
  } else {
    w.ratios[w.next] = r;
    w.next = (w.next + 1) % kWindow;
  }
  if (w.ratios.size() < kMinSamples) return;
  std::vector<double> v = w.ratios;
  const size_t k = std::min(v.size() - 1, size_t(std::ceil(quantile_ * double(v.size()))) - 1);
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(k), v.end());
  w.quantile = v[k];
}

double SloCalibrator::scale(int tokens) const {
  const Window& w = classes_[size_class(tokens)];
  if (w.ratios.size() >= kMinSamples) return w.quantile;
  if (!w.ratios.empty()) return *std::max_element(w.ratios.begin(), w.ratios.end());
  return std::max(1.0, mean_);
}

size_t SloCalibrator::samples() const {
  size_t n = 0;
  for (const Window& w : classes_) n += w.ratios.size();
  return n;
}

size_t SloCalibrator::samples(int tokens) const { return classes_[size_class(tokens)].ratios.size(); }

int slo_chunk(const LatencyTable& table, const SloCalibrator& cal, const std::vector<SeqWork>& decodes,
              const std::vector<SeqWork>& prefill, int max_chunk, double slo_ms) {
  int fixed = 0, pending = 0;
  for (const SeqWork& d : decodes) fixed += d.n;
  for (const SeqWork& p : prefill) pending += p.n;
  const int most = std::min(max_chunk, pending);
  // Within a class the scaled prediction grows with the chunk (binary search); across classes it need not.
  for (int c = SloCalibrator::size_class(fixed + std::max(most, 1)); c >= 0; --c) {
    const int lo = c == 0 ? 1 : SloCalibrator::class_max_tokens(c - 1) + 1;
    const int c_lo = std::max(1, lo - fixed);
    const int c_hi = int(std::min<long>(most, long(SloCalibrator::class_max_tokens(c)) - fixed));
    if (c_hi < c_lo) continue;
    const int got = table.largest_chunk(decodes, prefill, c_hi, slo_ms / cal.scale(lo));
    if (got >= c_lo) return got;
  }
  return 0;
}

LatencyTable LatencyTable::measure(Model& model, const std::vector<int>& counts, int reps) {
  SPEAR_CHECK(!counts.empty() && reps >= 1, "latency table: nothing to measure");
  LatencyTable t;
  const int max_n = *std::max_element(counts.begin(), counts.end());
  SPEAR_CHECK(max_n <= model.config().max_position_embeddings, "latency table: {} tokens exceed the context", max_n);
  auto cache = model.make_kv_cache(1, max_n);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int32_t> tok(0, model.config().vocab_size - 1);
  std::vector<int> sorted(counts);
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (int n : sorted) {
    SPEAR_CHECK(n >= 1, "latency table: token counts must be >= 1");
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& x : ids) x = tok(rng);
    const Batch b = Batch::single(ids, 0);
    model.forward(b, *cache, LogitsMode::LastPerSeq);  // warm-up
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      model.forward(b, *cache, LogitsMode::LastPerSeq);
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    t.tokens.push_back(n);
    t.ms.push_back(times[times.size() / 2]);
  }
  t.ms = monotone(t.ms);
  return t;
}

void LatencyTable::measure_batches(Model& model, int reps, int max_seqs, int max_context) {
  const int ctx_limit = std::min(max_context, model.config().max_position_embeddings - 1);
  SPEAR_CHECK(ctx_limit >= 8 && max_seqs >= 1 && reps >= 1, "latency table: batch grid too small");
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, model.config().vocab_size - 1);
  struct Point {
    std::vector<SeqWork> batch;
    double ms;
  };
  std::vector<Point> pts;
  auto time_batch = [&](KvCache& cache, const Batch& b) {
    model.forward(b, cache, LogitsMode::LastPerSeq);  // warm-up (same positions are rewritten each time)
    std::vector<double> ts;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      model.forward(b, cache, LogitsMode::LastPerSeq);
      ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
    return ts[ts.size() / 2];
  };
  const int chunk = std::min(128, ctx_limit / 2);
  for (int B : {1, 4, max_seqs}) {
    B = std::min(B, max_seqs);
    for (int C : {ctx_limit / 8, ctx_limit / 2, ctx_limit - 1}) {
      if (C < 1) continue;
      auto cache = model.make_kv_cache(B + 1, ctx_limit + 1);
      for (int s = 0; s < B; ++s) {  // C cached tokens per sequence (untimed)
        std::vector<int32_t> ids(static_cast<size_t>(C));
        for (auto& x : ids) x = tok(rng);
        model.forward(Batch::single(ids, 0, s), *cache, LogitsMode::None);
      }
      Batch b;
      std::vector<SeqWork> works;
      for (int s = 0; s < B; ++s) {
        b.seqs.push_back({s, 1, C, s});
        b.tokens.push_back(tok(rng));
        works.push_back({1, C});
      }
      pts.push_back({works, time_batch(*cache, b)});
      // The same decodes with a fresh prompt chunk beside them (slot B).
      b.seqs.push_back({B, chunk, 0, B});
      for (int i = 0; i < chunk; ++i) b.tokens.push_back(tok(rng));
      works.push_back({chunk, 0});
      pts.push_back({works, time_batch(*cache, b)});
    }
  }
  // residual = a · Δkpairs + b · (seqs − 1), a, b >= 0: 2 × 2 normal equations, clamping to the boundary.
  ms_per_kpair = ms_per_seq = 0;
  double s11 = 0, s12 = 0, s22 = 0, r1 = 0, r2 = 0;
  for (const Point& p : pts) {
    int total = 0;
    const double x1 = std::max(0.0, attention_kpairs(p.batch, total) - double(total) * (total + 1) / 2 / 1000.0);
    const double x2 = double(p.batch.size()) - 1;
    const double y = p.ms - predict_ms(total);
    s11 += x1 * x1, s12 += x1 * x2, s22 += x2 * x2, r1 += x1 * y, r2 += x2 * y;
  }
  const double det = s11 * s22 - s12 * s12;
  double a = det > 1e-12 ? (r1 * s22 - r2 * s12) / det : 0, b = det > 1e-12 ? (r2 * s11 - r1 * s12) / det : 0;
  if (a < 0 || b < 0) {  // the best fit with one of them at zero
    const double a1 = s11 > 0 ? std::max(0.0, r1 / s11) : 0, b1 = s22 > 0 ? std::max(0.0, r2 / s22) : 0;
    auto sse = [&](double A, double Bc) { return A * A * s11 + 2 * A * Bc * s12 + Bc * Bc * s22 - 2 * A * r1 - 2 * Bc * r2; };
    if (sse(a1, 0) <= sse(0, b1))
      a = a1, b = 0;
    else
      a = 0, b = b1;
  }
  ms_per_kpair = a;
  ms_per_seq = b;
}

void LatencyTable::save(const std::string& path) const {
  nlohmann::json j = {{"format", "spear-latency-table/1"}, {"device", device}, {"model", model},
                      {"tokens", tokens}, {"ms", ms}, {"ms_per_kpair", ms_per_kpair}, {"ms_per_seq", ms_per_seq}};
  std::ofstream f(path);
  SPEAR_CHECK(bool(f), "cannot write {}", path);
  f << j.dump(2) << "\n";
}

LatencyTable LatencyTable::load(const std::string& path) {
  std::ifstream f(path);
  SPEAR_CHECK(bool(f), "cannot read the latency table {}", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    fail("latency table {}: not JSON ({})", path, e.what());
  }
  SPEAR_CHECK(j.value("format", "") == "spear-latency-table/1", "latency table {}: unknown format", path);
  LatencyTable t;
  try {
    t.tokens = j.at("tokens").get<std::vector<int>>();
    t.ms = j.at("ms").get<std::vector<double>>();
    t.device = j.value("device", "");
    t.model = j.value("model", "");
    t.ms_per_kpair = j.value("ms_per_kpair", 0.0);
    t.ms_per_seq = j.value("ms_per_seq", 0.0);
  } catch (const std::exception& e) {
    fail("latency table {}: {}", path, e.what());
  }
  SPEAR_CHECK(!t.tokens.empty() && t.tokens.size() == t.ms.size(), "latency table {}: tokens and ms differ", path);
  SPEAR_CHECK(t.ms_per_kpair >= 0 && t.ms_per_seq >= 0, "latency table {}: negative batch terms", path);
  for (size_t i = 0; i < t.tokens.size(); ++i)
    SPEAR_CHECK(t.tokens[i] >= 1 && (i == 0 || t.tokens[i] > t.tokens[i - 1]) && t.ms[i] >= 0,
                "latency table {}: token counts must increase from 1 and times be >= 0", path);
  t.ms = monotone(t.ms);
  return t;
}

}  // namespace spear
