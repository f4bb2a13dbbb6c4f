// RoPE frequencies as transformers computes them (modeling_rope_utils.py): default, linear and the llama3
// frequency-dependent scaling of Llama 3.1/3.2.
#include <cmath>
#include <numbers>

#include "core/dtype.h"

#include "core/error.h"
#include "model/model.h"

namespace spear {

RopeTable make_rope_table(const RopeConfig& rope, int head_dim, DType round_to) {
  RopeTable t;
  const int half = head_dim / 2;
  t.inv_freq.resize(size_t(half));
  for (int i = 0; i < half; ++i) {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in fp32.
    float expo = float(2 * i) / float(head_dim);
    float inv = 1.0f / std::pow(float(rope.theta), expo);
    if (rope.type == "linear") {
      inv = inv / float(rope.factor);
    } else if (rope.type == "llama3") {
      const double low_wavelen = rope.original_max_position / rope.low_freq_factor;
      const double high_wavelen = rope.original_max_position / rope.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / inv;
      if (wavelen > low_wavelen) {
        inv = float(inv / rope.factor);  // long wavelengths: fully interpolated
      } else if (wavelen >= high_wavelen) {  // medium: blend between interpolated and original
        double smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) /
                        (rope.high_freq_factor - rope.low_freq_factor);
        inv = float((1.0 - smooth) * inv / rope.factor + smooth * inv);
      }
    } else if (rope.type != "default") {
      fail("RoPE type '{}' is not supported", rope.type);
    }
    // transformers keeps inv_freq as a module buffer, so casting the model to the checkpoint's dtype (as
    // loading a bf16 checkpoint does) rounds the frequencies to that dtype; the upcast fp32 model keeps the
    // rounded values. The golden logits and reference perplexities were computed that way (measured: without
    // this rounding logits differ by up to 0.03 at position 127 on ref-llama-23m, 9e-2 on llama3-scaled-tiny).
    if (round_to == DType::BF16) inv = bf16_to_f32(f32_to_bf16(inv));
    else if (round_to == DType::F16) inv = f16_to_f32(f32_to_f16(inv));
    t.inv_freq[size_t(i)] = inv;
  }
  return t;
}

}  // namespace spear
