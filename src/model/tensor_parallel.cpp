#include "model/tensor_parallel.h"

#include "core/error.h"

namespace spear {

namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Rank's [begin, begin + n) of `total`, which must divide by size.
std::pair<int, int> part(const std::string& what, int total, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) fail("tensor parallel: rank {} of {} is invalid", rank, size);
  if (total % size != 0)
    fail("tensor parallel: {} has {} features, which do not split over {} ranks", what, total, size);
  const int n = total / size;
  return {rank * n, n};
}

// Rows [r0, r0 + n) of a row-major [rows, cols] array.
template <typename T>
std::vector<T> take_rows(const std::vector<T>& a, size_t cols, int r0, int n) {
  return std::vector<T>(a.begin() + ptrdiff_t(size_t(r0) * cols), a.begin() + ptrdiff_t(size_t(r0 + n) * cols));
}

// Columns [c0, c0 + n) of every row of a row-major [rows, cols] array.
template <typename T>
std::vector<T> take_cols(const std::vector<T>& a, int rows, int cols, int c0, int n) {
  std::vector<T> out(size_t(rows) * size_t(n));
  for (int r = 0; r < rows; ++r)
    std::copy_n(a.begin() + ptrdiff_t(size_t(r) * cols + c0), n, out.begin() + ptrdiff_t(size_t(r) * n));
  return out;
}

}  // namespace

ShardKind shard_kind_of(const std::string& module) {
  for (const char* s : {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
    if (ends_with(module, s)) return ShardKind::OutRows;
  for (const char* s : {"o_proj", "down_proj"})
    if (ends_with(module, s)) return ShardKind::InCols;
  return ShardKind::Replicated;
}

LinearWeights shard_linear(const LinearWeights& w, ShardKind kind, int rank, int size) {
  if (kind == ShardKind::Replicated || size == 1) return w;
  LinearWeights s;
  s.name = w.name;
  if (kind == ShardKind::OutRows) {
    auto [r0, n] = part(w.name, w.out_features, rank, size);
    s.out_features = n;
    s.in_features = w.in_features;
    s.w = take_rows(w.w, size_t(w.in_features), r0, n);
  } else {
    auto [c0, n] = part(w.name, w.in_features, rank, size);
    s.out_features = w.out_features;
    s.in_features = n;
    s.w = take_cols(w.w, w.out_features, w.in_features, c0, n);
  }
  s.bias = shard_bias(w.bias, kind, rank, size);
  return s;
}

std::vector<float> shard_bias(const std::vector<float>& b, ShardKind kind, int rank, int size) {
  if (b.empty() || kind == ShardKind::Replicated || size == 1) return b;
  if (kind == ShardKind::InCols) return rank == 0 ? b : std::vector<float>{};
  auto [r0, n] = part("bias", int(b.size()), rank, size);
  return take_rows(b, 1, r0, n);
}

PackedQuantWeights shard_quant(const std::string& module, const PackedQuantWeights& w, ShardKind kind, int rank,
                               int size) {
  if (kind == ShardKind::Replicated || size == 1) return w;
  // Through the canonical unpacked codes: slicing packed nibbles directly would need an even column offset.
  QuantizedMatrix m = unpack_quantized(w);
  QuantizedMatrix s;
  s.params = m.params;
  const int G = m.params.groups(m.in);
  if (kind == ShardKind::OutRows) {
    auto [r0, n] = part(module, m.out, rank, size);
    s.out = n;
    s.in = m.in;
    s.q = take_rows(m.q, size_t(m.in), r0, n);
    s.scales = take_rows(m.scales, size_t(G), r0, n);
    s.zeros = take_rows(m.zeros, size_t(G), r0, n);
  } else {
    auto [c0, n] = part(module, m.in, rank, size);
    s.out = m.out;
    s.in = n;
    s.q = take_cols(m.q, m.out, m.in, c0, n);
    if (w.group_size <= 0) {  // per channel: the row's scale and zero cover any slice of it
      s.scales = m.scales;
      s.zeros = m.zeros;
    } else {
      if (n % w.group_size != 0)
        fail(
            "tensor parallel: {} splits its {} input features into slices of "
            "{}, not whole quantization groups of {}",
            module, m.in, n, w.group_size);
      const int g0 = c0 / w.group_size, ng = n / w.group_size;
      s.scales = take_cols(m.scales, m.out, G, g0, ng);
      s.zeros = take_cols(m.zeros, m.out, G, g0, ng);
    }
  }
  return pack_quantized(s);
}

Compensator shard_compensator(const Compensator& c, ShardKind kind, int rank, int size) {
  if (kind == ShardKind::Replicated || size == 1) return c;
  Compensator s = c;
  if (kind == ShardKind::OutRows) {
    auto [r0, n] = part(c.module + " (compensator)", c.out, rank, size);
    s.out = n;
    s.B = take_rows(c.B, size_t(c.rank), r0, n);
  } else {
    auto [c0, n] = part(c.module + " (compensator)", c.in, rank, size);
    s.in = n;
    s.A = take_cols(c.A, c.rank, c.in, c0, n);
  }
  return s;
}

}  // namespace spear
