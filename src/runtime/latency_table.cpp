#include "runtime/latency_table.h"

#include <algorithm>
#include <chrono>
#include <fstream>
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

int LatencyTable::largest_chunk(int fixed, int max_chunk, double budget_ms) const {
  if (predict_ms(fixed + 0) > budget_ms && fixed > 0) return 0;
  int lo = 0, hi = max_chunk;  // invariant: lo fits (or is 0)
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (predict_ms(fixed + mid) <= budget_ms)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
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

void LatencyTable::save(const std::string& path) const {
  nlohmann::json j = {{"format", "spear-latency-table/1"}, {"device", device}, {"model", model},
                      {"tokens", tokens}, {"ms", ms}};
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
  } catch (const std::exception& e) {
    fail("latency table {}: {}", path, e.what());
  }
  SPEAR_CHECK(!t.tokens.empty() && t.tokens.size() == t.ms.size(), "latency table {}: tokens and ms differ", path);
  for (size_t i = 0; i < t.tokens.size(); ++i)
    SPEAR_CHECK(t.tokens[i] >= 1 && (i == 0 || t.tokens[i] > t.tokens[i - 1]) && t.ms[i] >= 0,
                "latency table {}: token counts must increase from 1 and times be >= 0", path);
  t.ms = monotone(t.ms);
  return t;
}

}  // namespace spear
