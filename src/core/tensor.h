#pragma once
// A 2-D buffer owned by a backend: activations are [tokens, features], row-major. Kernels take raw
// pointers from it; the model code never touches the elements, so the same forward pass runs on any device.
#include <cstdint>
#include <memory>

#include "core/dtype.h"

namespace spear {

enum class Device : uint8_t { CPU, CUDA };

struct Tensor {
  std::shared_ptr<void> storage;  // keeps the allocation alive; views share it
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  int64_t rows = 0, cols = 0;

  int64_t numel() const { return rows * cols; }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  // Rows [r0, r0 + n) as a view (no copy).
  Tensor rows_view(int64_t r0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<uint8_t*>(data) + size_t(r0 * cols) * dtype_size(dtype);
    t.rows = n;
    return t;
  }
};

}  // namespace spear
