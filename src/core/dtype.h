#pragma once
// Element types that appear in checkpoints and packages, with their safetensors names.
#include <cstdint>
#include <cstring>
#include <string_view>

namespace spear {

enum class DType : uint8_t { F32, F16, BF16, F64, I8, U8, I16, I32, I64, U32, Bool };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);          // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(std::string_view s, DType* out);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN preserved (quiet). Same rule as torch's float->bfloat16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of type t at src to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace spear
