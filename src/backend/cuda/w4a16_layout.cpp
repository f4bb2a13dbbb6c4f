// Host side of the W4A16 GEMM: which quantized matrices it takes, and the shuffle of the canonical packed codes
// into the mma fragment order the kernel streams (and back, for tests).
//
// Index math (w4a16_gemm.cu explains why): code (r, c) of the [n_pad, k_pad] padded matrix lives in
//   word = ((r/16 · (k_pad/64) + c/64) · 32 + lane) · 4 + (c % 64)/16,   lane = 4 · (r % 8) + (c % 8)/2,
//   bit  = 4 · i + 16 · (c % 2),                                         i = (r % 16)/8 + 2 · ((c % 16)/8).
// Padding: columns in [k, k_pad) of a real row hold that row's zero point (of the last group), rows in
// [n, n_pad) hold code 0 with zero point 0 and scale 0, so every padded weight is exactly 0.
#include <algorithm>

#include "backend/cpu/int4_linear.h"
#include "backend/cuda/w4a16_gemm.h"
#include "core/error.h"

namespace spear::cuda {

namespace {

constexpr int kTileRows = 16, kKBlock = 64;

int round_up(int v, int m) { return (v + m - 1) / m * m; }

struct CodeSlot {
  size_t word;
  int bit;
};

CodeSlot code_slot(int kblocks, int r, int c) {
  const int rr = r % 16, cc = c % 16;
  const int lane = 4 * (rr % 8) + (cc % 8) / 2;
  const int i = rr / 8 + 2 * (cc / 8);
  const size_t word = ((size_t(r / kTileRows) * kblocks + c / kKBlock) * 32 + lane) * 4 + (c % kKBlock) / 16;
  return {word, 4 * i + 16 * (c % 2)};
}

// bf16 bits of 128 + z: exact for 0 <= z < 128 (bf16 has unit steps in [128, 256)).
uint16_t zero_bits(int z) { return uint16_t(0x4300 + z); }

// Why the fast kernel cannot take p, or nullptr.
const char* unsupported_reason(const PackedQuantWeights& p) {
  if (p.container_bits != 4) return "the codes are not in a 4-bit container";
  if (p.bits < 2 || p.bits > 4) return "bits must be 2..4";
  if (p.out <= 0 || p.in <= 0) return "empty matrix";
  if (p.group_size > 0 && p.group_size % 16 != 0) return "group size is not a multiple of 16";
  const size_t G = size_t(p.groups());
  if (p.qweight.size() != size_t(p.out) * p.row_bytes() || p.scales.size() != size_t(p.out) * G ||
      p.zeros.size() != p.scales.size())
    return "inconsistent qweight / scales / zeros sizes";
  for (uint8_t z : p.zeros)
    if (z > 15) return "a zero point does not fit the 4-bit container";
  return nullptr;
}

}  // namespace

bool w4_supported(const PackedQuantWeights& p) { return unsupported_reason(p) == nullptr; }

W4Layout w4_prepare(const PackedQuantWeights& p) {
  if (const char* why = unsupported_reason(p))
    fail("w4_prepare: {}x{} matrix ({} bits, {}-bit container, group size {}) not supported: {}", p.out, p.in, p.bits,
         p.container_bits, p.group_size, why);
  W4Layout l;
  l.n = p.out;
  l.k = p.in;
  l.n_pad = round_up(p.out, kTileRows);
  l.k_pad = round_up(p.in, kKBlock);
  l.group_size = p.group_size > 0 ? p.group_size : -1;
  l.groups = p.groups();
  const int G = l.groups, glen = p.group_len();
  const size_t n_pad = size_t(l.n_pad);

  l.scales.assign(size_t(G) * n_pad, 0.f);
  l.zeros.assign(size_t(G) * n_pad, zero_bits(0));
  for (int r = 0; r < p.out; ++r)
    for (int g = 0; g < G; ++g) {
      l.scales[size_t(g) * n_pad + r] = p.scales[size_t(r) * G + g];
      l.zeros[size_t(g) * n_pad + r] = zero_bits(p.zeros[size_t(r) * G + g]);
    }

  // Codes, one (16-row tile, 64-column k-block) = 128 words at a time; a word holds, for lane (g, t) and
  // k-step j, the pairs (row g + 8·(i&1), columns 16j + 2t + 8·(i>>1) + {0, 1}) of fragment registers i = 0..3.
  const int kblocks = l.k_pad / kKBlock, tiles = l.n_pad / kTileRows;
  const size_t rb = p.row_bytes();
  l.q.assign(n_pad * l.k_pad / 8, 0u);
  auto code_at = [&](int r, int c) -> uint32_t {
    if (r >= p.out) return 0;                                                       // padding row
    if (c >= p.in) return p.zeros[size_t(r) * G + std::min(c / glen, G - 1)];       // padding column
    return (p.qweight[size_t(r) * rb + c / 2] >> ((c & 1) * 4)) & 15u;
  };
#pragma omp parallel for schedule(static)
  for (int tile = 0; tile < tiles; ++tile) {
    const int r0 = tile * kTileRows;
    const bool rows_inside = r0 + kTileRows <= p.out;
    for (int kb = 0; kb < kblocks; ++kb) {
      const int c0 = kb * kKBlock;
      const bool inside = rows_inside && c0 + kKBlock <= p.in;  // no padding: read whole bytes
      uint32_t* out = l.q.data() + (size_t(tile) * kblocks + kb) * 128;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int j = 0; j < 4; ++j) {
          uint32_t word = 0;
          for (int i = 0; i < 4; ++i) {
            const int r = r0 + g + 8 * (i & 1);
            const int c = c0 + 16 * j + 2 * t + 8 * (i >> 1);  // even: (c, c + 1) share one byte
            uint32_t lo, hi;
            if (inside) {
              const uint8_t b = p.qweight[size_t(r) * rb + c / 2];
              lo = b & 15u;
              hi = b >> 4;
            } else {
              lo = code_at(r, c);
              hi = code_at(r, c + 1);
            }
            word |= lo << (4 * i) | hi << (16 + 4 * i);
          }
          out[lane * 4 + j] = word;
        }
      }
    }
  }
  return l;
}

PackedQuantWeights w4_unprepare(const W4Layout& l, int bits) {
  SPEAR_CHECK(bits >= 2 && bits <= 4, "w4_unprepare: bits must be 2..4, got {}", bits);
  SPEAR_CHECK(l.n > 0 && l.k > 0 && l.n_pad == round_up(l.n, kTileRows) && l.k_pad == round_up(l.k, kKBlock),
              "w4_unprepare: bad sizes n {} k {} n_pad {} k_pad {}", l.n, l.k, l.n_pad, l.k_pad);
  const int G = l.groups;
  const size_t n_pad = size_t(l.n_pad);
  SPEAR_CHECK(G >= 1 && l.q.size() == n_pad * l.k_pad / 8 && l.scales.size() == size_t(G) * n_pad &&
                  l.zeros.size() == l.scales.size(),
              "w4_unprepare: inconsistent layout sizes (n {} k {} groups {})", l.n, l.k, G);
  PackedQuantWeights p;
  p.out = l.n;
  p.in = l.k;
  p.bits = bits;
  p.group_size = l.group_size;
  p.container_bits = 4;
  SPEAR_CHECK(p.groups() == G, "w4_unprepare: {} groups for k {} and group size {}", G, l.k, l.group_size);
  p.scales.resize(size_t(p.out) * G);
  p.zeros.resize(size_t(p.out) * G);
  for (int r = 0; r < p.out; ++r)
    for (int g = 0; g < G; ++g) {
      const size_t src = size_t(g) * n_pad + r;
      const int z = int(l.zeros[src]) - 0x4300;
      SPEAR_CHECK(z >= 0 && z <= 15, "w4_unprepare: zero bits {:#06x} at row {} group {} are not 128 + z",
                  l.zeros[src], r, g);
      p.scales[size_t(r) * G + g] = l.scales[src];
      p.zeros[size_t(r) * G + g] = uint8_t(z);
    }
  const size_t rb = p.row_bytes();
  const int kblocks = l.k_pad / kKBlock;
  p.qweight.assign(size_t(p.out) * rb, 0);
  for (int r = 0; r < p.out; ++r)
    for (int c = 0; c < p.in; ++c) {
      const CodeSlot s = code_slot(kblocks, r, c);
      const uint32_t code = (l.q[s.word] >> s.bit) & 15u;
      p.qweight[size_t(r) * rb + c / 2] |= uint8_t(code << ((c & 1) * 4));
    }
  return p;
}

}  // namespace spear::cuda
