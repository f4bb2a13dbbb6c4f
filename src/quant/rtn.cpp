#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "quant/quantizer.h"

namespace spear {

QuantGrid find_grid(const float* w, int n, int stride, const QuantParams& p) {
  float mn = w[0], mx = w[0];
  for (int i = 1; i < n; ++i) {
    mn = std::min(mn, w[size_t(i) * stride]);
    mx = std::max(mx, w[size_t(i) * stride]);
  }
  // Keep 0 inside the range (as GPTQ's quantizer does) so the zero point is always a valid code; for rows
  // with both signs, which is every row of real checkpoints, this is exactly reference.json's definition.
  mn = std::min(mn, 0.f);
  mx = std::max(mx, 0.f);
  QuantGrid g;
  const int max_q = p.max_q();
  if (p.symmetric) {
    // Symmetric: zero fixed mid-grid, scale from the larger magnitude (GPTQ's sym convention).
    const float amax = std::max(-mn, mx);
    g.scale = 2.f * amax / float(max_q);
    g.zero = (max_q + 1) / 2;
  } else {
    g.scale = (mx - mn) / float(max_q);
    g.zero = int(std::nearbyint(-mn / (g.scale > 0 ? g.scale : 1.f)));
  }
  if (!(g.scale > 0)) {  // all-zero group: any scale reproduces it exactly
    g.scale = 1.f;
    g.zero = p.symmetric ? (max_q + 1) / 2 : 0;
  }
  g.zero = std::clamp(g.zero, 0, max_q);
  return g;
}

std::vector<float> QuantizedMatrix::dequantize() const {
  std::vector<float> w(size_t(out) * in);
  for (int r = 0; r < out; ++r)
    for (int c = 0; c < in; ++c) w[size_t(r) * in + c] = dequant(r, c);
  return w;
}

QuantizedMatrix rtn_quantize(const float* w, int out, int in, const QuantParams& p) {
  if (p.bits < 2 || p.bits > 8) fail("bits must be in 2..8, got {}", p.bits);
  if (p.group_size == 0 || p.group_size < -1) fail("group size must be -1 (per channel) or positive, got {}", p.group_size);
  QuantizedMatrix m;
  m.out = out;
  m.in = in;
  m.params = p;
  const int G = p.groups(in), glen = p.group_len(in);
  m.q.resize(size_t(out) * in);
  m.scales.resize(size_t(out) * G);
  m.zeros.resize(size_t(out) * G);
  // Rows are independent: parallel, and the result does not depend on the thread count.
#pragma omp parallel for schedule(static) if (size_t(out) * in >= (size_t(1) << 20))
  for (int r = 0; r < out; ++r) {
    for (int g = 0; g < G; ++g) {
      const int c0 = g * glen, n = std::min(glen, in - c0);
      const float* row = w + size_t(r) * in + c0;
      QuantGrid grid = find_grid(row, n, 1, p);
      m.scales[size_t(r) * G + g] = grid.scale;
      m.zeros[size_t(r) * G + g] = uint8_t(grid.zero);
      for (int i = 0; i < n; ++i) m.q[size_t(r) * in + c0 + i] = uint8_t(quantize_value(row[i], grid, p.max_q()));
    }
  }
  return m;
}

}  // namespace spear
