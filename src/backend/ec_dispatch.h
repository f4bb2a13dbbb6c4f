#pragma once
// Adaptive EC dispatch (DESIGN.md §5): which implementation runs a linear's error compensator, by module
// shape, rank and number of tokens. `spear tune --device cuda` measures every path on the device and writes
// the table as JSON; the engine loads it (--ec-dispatch FILE, or ec_dispatch.json in the model directory).
// Shapes or token counts the table lacks fall back to the backend's built-in rule.
#include <map>
#include <string>
#include <vector>

namespace spear {

// Naive: separate kernels after the GEMM (the reference). Fused: A·x, the gate and B in the W4 decode
// kernel's launch and epilogue. Overlapped: the EC on a second stream beside the W4 GEMM, joined before one
// add. Auto: the dispatch table, else the built-in rule.
enum class EcPath { Auto, Naive, Fused, Overlapped };
const char* ec_path_name(EcPath p);
EcPath parse_ec_path(const std::string& s);  // "auto" | "naive" | "fused" | "overlapped"; throws otherwise

class EcDispatchTable {
 public:
  struct Entry {
    int n = 0, k = 0, rank = 0, gate_width = 0, m = 0;  // module [out = n, in = k], EC shape, tokens
    EcPath path = EcPath::Auto;                         // the fastest measured
    std::map<EcPath, double> us;                        // every measured path, µs per call
  };
  std::string device, model;
  std::vector<Entry> entries;

  // Token counts `spear tune` measures by default.
  static std::vector<int> default_tokens();
  // Records a measurement row; path = the fastest of `us`.
  void add(int n, int k, int rank, int gate_width, int m, const std::map<EcPath, double>& us);
  // The table's choice for m tokens: the entry of this shape with the smallest measured m >= m (the largest
  // when m is beyond them); Auto when the shape is absent.
  EcPath lookup(int n, int k, int rank, int gate_width, int m) const;
  void save(const std::string& path) const;
  static EcDispatchTable load(const std::string& path);  // throws spear::Error naming the file on bad input
};

}  // namespace spear
