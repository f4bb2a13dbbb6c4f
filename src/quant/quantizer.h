#pragma once
// Weight quantization: the integer grid (RTN), GPTQ, and the quantized-matrix type they share.
//
// Asymmetric grid (default), per output row (group_size = -1) or per group of `group_size` input columns:
//   mn = min(w), mx = max(w) over the group, scale = (mx - mn) / (2^bits - 1), zero = round(-mn / scale),
//   q = clamp(round(w / scale) + zero, 0, 2^bits - 1), w' = (q - zero) * scale      (round half to even)
// which is reference.json's definition. Symmetric (--sym): scale = max|w| / (2^(bits-1) - 1/2) ... see rtn.cpp.
// Statistics in fp32 on the fp32 (upcast bf16) weights, as the reference.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace spear {

struct QuantParams {
  int bits = 4;          // 2..8
  int group_size = -1;   // -1 = one group per output row (per-channel)
  bool symmetric = false;

  int max_q() const { return (1 << bits) - 1; }
  int groups(int in_features) const { return group_size <= 0 ? 1 : (in_features + group_size - 1) / group_size; }
  int group_len(int in_features) const { return group_size <= 0 ? in_features : group_size; }
};

// Unpacked quantized matrix: q [out, in] integers in [0, 2^bits - 1]; scales and zeros [out, groups].
// Group of column c: c / group_len (GPTQ with act-order uses static groups, so this holds for it too).
struct QuantizedMatrix {
  int out = 0, in = 0;
  QuantParams params;
  std::vector<uint8_t> q;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;

  float dequant(int r, int c) const {
    const int g = c / params.group_len(in);
    const size_t gi = size_t(r) * params.groups(in) + g;
    return (float(q[size_t(r) * in + c]) - float(zeros[gi])) * scales[gi];
  }
  std::vector<float> dequantize() const;  // [out, in]
};

// The grid (scale, zero) for one group of weights, and quantizing one value on it.
struct QuantGrid {
  float scale = 1.f;
  int zero = 0;
};
QuantGrid find_grid(const float* w, int n, int stride, const QuantParams& p);
inline int quantize_value(float w, const QuantGrid& g, int max_q);

// Round-to-nearest over the whole matrix W [out, in].
QuantizedMatrix rtn_quantize(const float* w, int out, int in, const QuantParams& p);

// ---- inline

inline int quantize_value(float w, const QuantGrid& g, int max_q) {
  // nearbyint rounds half to even in the default rounding mode, like torch.round.
  int q = int(__builtin_nearbyintf(w / g.scale)) + g.zero;
  return q < 0 ? 0 : (q > max_q ? max_q : q);
}

}  // namespace spear
