// GPTQ checkpoint format: torch-free bit math shared by the CPU and CUDA kernels.
//
// Both qweight (packed along K) and qzeros (packed along N) are little-endian bit streams: value i
// of a packed run occupies bits [bits*i, bits*i + bits) counted from bit 0 of the run's first int32
// word. For 2/4/8 bits a value never straddles a word; for 3 bits values 10 and 21 of every 32 do
// (the AutoGPTQ layout: v10 spans words 0-1, v21 spans words 1-2).
//
//   qweight [K*bits/32, N] int32   q(k, n) = stream of column n, value k (word stride N)
//   qzeros  [G, ceil(N*bits/32)]   z(g, n) = stream of row g, value n (word stride 1)
//   scales  [G, N]                 W[k, n] = scales[g, n] * (q(k, n) - (z(g, n) + zero_offset))
//   g_idx   [K] int32              g = g_idx[k]
//
// zero_offset is 1 for checkpoint_format "gptq" (v1 stores zero - 1) and 0 for "gptq_v2".
#pragma once
#include <stdint.h>

#include "common/float_bits.h"
#include "common/hostdev.h"

namespace slimformer {
namespace gptq {

SF_HD bool supported_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

SF_HD uint32_t value_mask(int bits) { return (1u << bits) - 1u; }

// Values per unit and int32 words per unit, where a unit is the smallest run of whole words
// holding a whole number of values: one word for 2/4/8 bits, three words (32 values) for 3 bits.
SF_HD int values_per_unit(int bits) { return bits == 3 ? 32 : 32 / bits; }
SF_HD int words_per_unit(int bits) { return bits == 3 ? 3 : 1; }

// Value `i` of a packed bit stream whose consecutive words are `stride` int32s apart.
SF_HD uint32_t unpack_stream(const int32_t* words, int64_t stride, int bits, int64_t i) {
  const int64_t bit = static_cast<int64_t>(bits) * i;
  const int64_t w = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint32_t v = static_cast<uint32_t>(words[w * stride]) >> shift;
  if (shift + bits > 32) v |= static_cast<uint32_t>(words[(w + 1) * stride]) << (32 - shift);
  return v & value_mask(bits);
}

// Value `j` (0 <= j < values_per_unit) of one unit whose words are w0, w1, w2 (w1/w2 unused below
// 3 bits). With a compile-time j this folds to one or two shift/mask pairs.
SF_HD uint32_t unpack_unit(uint32_t w0, uint32_t w1, uint32_t w2, int bits, int j) {
  const int bit = bits * j;
  const uint32_t w = bit < 32 ? w0 : (bit < 64 ? w1 : w2);
  const uint32_t next = bit < 32 ? w1 : w2;
  const int shift = bit & 31;
  uint32_t v = w >> shift;
  if (shift + bits > 32) v |= next << (32 - shift);
  return v & value_mask(bits);
}

// Number of int32 words per qzeros row for N output features.
SF_HD int64_t qzeros_words(int64_t n, int bits) { return (n * bits + 31) / 32; }

// The zero point as used in the dequantization formula.
SF_HD float zero_point(const int32_t* qzeros_row, int64_t n, int bits, int zero_offset) {
  return static_cast<float>(unpack_stream(qzeros_row, 1, bits, n)) + static_cast<float>(zero_offset);
}

enum class ScaleType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

SF_HD float load_scale(const void* scales, ScaleType t, int64_t idx) {
  switch (t) {
    case ScaleType::kFloat16:
      return half_bits_to_float(static_cast<const uint16_t*>(scales)[idx]);
    case ScaleType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(scales)[idx]);
    default:
      return static_cast<const float*>(scales)[idx];
  }
}

}  // namespace gptq
}  // namespace slimformer
