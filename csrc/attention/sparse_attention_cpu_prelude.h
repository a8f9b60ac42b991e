// First include of every sparse attention CPU kernel translation unit. As in
// gptq/gptq_cpu_simd_prelude.h: the SIMD files compile their kernels inside a `#pragma GCC target`
// region, so every header with inline or template code that other translation units also compile
// (the standard library, the scalar element conversions below) is included here, before that
// region; no merged weak symbol can then carry AVX/AVX-512 code into the scalar path. The kernel
// templates (sparse_attention_cpu_impl.h) live in an anonymous namespace inside each region.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "attention/sparse_attention_cpu.h"
#include "attention/sparse_attention_params.h"

namespace slimformer::attention::cpu_detail {

// IEEE binary16 bits -> float, exact (subnormals, inf and NaN included); portable path only.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400u));
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace slimformer::attention::cpu_detail
