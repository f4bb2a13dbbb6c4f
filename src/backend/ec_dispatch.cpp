#include "backend/ec_dispatch.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear {

const char* ec_path_name(EcPath p) {
  switch (p) {
    case EcPath::Naive: return "naive";
    case EcPath::Fused: return "fused";
    case EcPath::Overlapped: return "overlapped";
    default: return "auto";
  }
}

EcPath parse_ec_path(const std::string& s) {
  for (EcPath p : {EcPath::Auto, EcPath::Naive, EcPath::Fused, EcPath::Overlapped})
    if (s == ec_path_name(p)) return p;
  fail("unknown EC path '{}' (auto, naive, fused or overlapped)", s);
}

std::vector<int> EcDispatchTable::default_tokens() { return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048}; }

void EcDispatchTable::add(int n, int k, int rank, int gate_width, int m, const std::map<EcPath, double>& us) {
  Entry e{n, k, rank, gate_width, m, EcPath::Auto, us};
  double best = std::numeric_limits<double>::infinity();
  for (const auto& [p, t] : us)
    if (t < best) best = t, e.path = p;
  entries.push_back(std::move(e));
}

EcPath EcDispatchTable::lookup(int n, int k, int rank, int gate_width, int m) const {
  const Entry* above = nullptr;  // smallest m' >= m
  const Entry* largest = nullptr;
  for (const Entry& e : entries) {
    if (e.n != n || e.k != k || e.rank != rank || e.gate_width != gate_width) continue;
    if (e.m >= m && (!above || e.m < above->m)) above = &e;
    if (!largest || e.m > largest->m) largest = &e;
  }
  const Entry* e = above ? above : largest;
  return e ? e->path : EcPath::Auto;
}

void EcDispatchTable::save(const std::string& path) const {
  nlohmann::json rows = nlohmann::json::array();
  for (const Entry& e : entries) {
    nlohmann::json us = nlohmann::json::object();
    for (const auto& [p, t] : e.us) us[ec_path_name(p)] = t;
    rows.push_back({{"n", e.n}, {"k", e.k}, {"rank", e.rank}, {"gate_width", e.gate_width}, {"m", e.m},
                    {"path", ec_path_name(e.path)}, {"us", us}});
  }
  nlohmann::json doc = {{"format", "spear-ec-dispatch-1"}, {"device", device}, {"model", model}, {"entries", rows}};
  std::ofstream f(path);
  if (!f) fail("cannot write the EC dispatch table {}", path);
  f << doc.dump(1) << "\n";
  if (!f) fail("error writing the EC dispatch table {}", path);
}

EcDispatchTable EcDispatchTable::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("cannot open the EC dispatch table {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  EcDispatchTable t;
  try {
    const nlohmann::json doc = nlohmann::json::parse(ss.str());
    if (doc.value("format", "") != "spear-ec-dispatch-1")
      fail("{}: not an EC dispatch table (format '{}', expected spear-ec-dispatch-1)", path, doc.value("format", ""));
    t.device = doc.value("device", "");
    t.model = doc.value("model", "");
    for (const auto& r : doc.at("entries")) {
      Entry e;
      e.n = r.at("n").get<int>(), e.k = r.at("k").get<int>(), e.rank = r.at("rank").get<int>();
      e.gate_width = r.at("gate_width").get<int>(), e.m = r.at("m").get<int>();
      if (e.n < 1 || e.k < 1 || e.rank < 1 || e.gate_width < 0 || e.m < 1)
        fail("{}: entry with n {}, k {}, rank {}, gate width {}, m {} is out of range", path, e.n, e.k, e.rank,
             e.gate_width, e.m);
      e.path = parse_ec_path(r.at("path").get<std::string>());
      if (e.path == EcPath::Auto) fail("{}: an entry's path must be naive, fused or overlapped", path);
      if (r.contains("us"))
        for (const auto& [name, v] : r.at("us").items()) e.us[parse_ec_path(name)] = v.get<double>();
      t.entries.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& ex) {
    fail("{}: malformed EC dispatch table: {}", path, ex.what());
  }
  return t;
}

}  // namespace spear
